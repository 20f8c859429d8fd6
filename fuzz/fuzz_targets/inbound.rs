#![no_main]
//! Raw client bytes after the WebSocket upgrade, through the server's real
//! per-connection code. Input format: `im_fuzz` crate docs.

use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: im_fuzz::alloc::Limited = im_fuzz::alloc::Limited;

fuzz_target!(
    init: {
        im_fuzz::alloc::init_from_args();
        im_fuzz::init_logging();
    },
    |data: &[u8]| im_fuzz::alloc::check_iteration(|| im_fuzz::run_inbound(data))
);
