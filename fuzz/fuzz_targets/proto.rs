#![no_main]
//! One Binary frame's payload through `im_proto::decode` (re-encoding must
//! round-trip), and any UTF-8 input through the login token check.

use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: im_fuzz::alloc::Limited = im_fuzz::alloc::Limited;

fuzz_target!(
    init: {
        im_fuzz::alloc::init_from_args();
        im_fuzz::init_logging();
    },
    |data: &[u8]| im_fuzz::alloc::check_iteration(|| im_fuzz::run_proto(data))
);
