//! Allocation limits that hold without a sanitizer.
//!
//! libFuzzer's `-malloc_limit_mb` works through the sanitizers' malloc
//! hooks; with `cargo fuzz --sanitizer none` (what works on stable Rust)
//! nothing calls them, so the flag is silently ignored. This global
//! allocator enforces the same bound for every Rust allocation: one larger
//! than `-malloc_limit_mb` (read from the command line at start; libFuzzer's
//! default is `-rss_limit_mb`, 2048) prints a report and aborts, which
//! libFuzzer records as a crash with its input.
//!
//! It also keeps the live byte count, so [`check_iteration`] can fail an
//! input whose run grew the heap by more than [`ITERATION_GROWTH_MAX`]
//! (`IMSIM_FUZZ_ITERATION_LIMIT_MB` to change it): a bounded but
//! disproportionate allocation for a few kilobytes of input.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The allocator: `#[global_allocator] static A: Limited = Limited;`.
pub struct Limited;

static LIMIT: AtomicUsize = AtomicUsize::new(2048 << 20);
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// Default bound on how much one input may grow the heap (peak live bytes
/// during the input minus live bytes before it).
pub const ITERATION_GROWTH_MAX: usize = 256 << 20;

fn over_limit(size: usize) -> ! {
    // Report without allocating (formatting integers into stderr does not).
    let limit = LIMIT.swap(usize::MAX, Ordering::Relaxed);
    let _ = writeln!(
        std::io::stderr(),
        "==imsim-fuzz== ERROR: out-of-memory (malloc({size}) > -malloc_limit_mb={})",
        limit >> 20
    );
    std::process::abort()
}

fn grew(size: usize) {
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged; the bookkeeping around it never touches the memory.
unsafe impl GlobalAlloc for Limited {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > LIMIT.load(Ordering::Relaxed) {
            over_limit(layout.size());
        }
        // SAFETY: forwarded as is (see above).
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > LIMIT.load(Ordering::Relaxed) {
            over_limit(layout.size());
        }
        // SAFETY: forwarded as is (see above).
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded as is (see above).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > LIMIT.load(Ordering::Relaxed) {
            over_limit(new_size);
        }
        // SAFETY: forwarded as is (see above).
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

/// Reads `-malloc_limit_mb=N` (else `-rss_limit_mb=N`, as libFuzzer does)
/// from the command line; 0 means no limit. Call once, from the target's
/// `init`.
pub fn init_from_args() {
    let arg = |name: &str| {
        std::env::args()
            .filter_map(|a| a.strip_prefix(name).and_then(|v| v.parse::<usize>().ok()))
            .next_back()
    };
    let mb = arg("-malloc_limit_mb=")
        .filter(|&mb| mb > 0)
        .or_else(|| arg("-rss_limit_mb="))
        .unwrap_or(2048);
    let bytes = if mb == 0 {
        usize::MAX
    } else {
        mb.saturating_mul(1 << 20)
    };
    LIMIT.store(bytes, Ordering::Relaxed);
}

/// Runs one input and fails it if the heap grew by more than the
/// iteration limit while it ran.
pub fn check_iteration(run: impl FnOnce()) {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    run();
    let growth = PEAK.load(Ordering::Relaxed).saturating_sub(before);
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let max = *MAX.get_or_init(|| {
        std::env::var("IMSIM_FUZZ_ITERATION_LIMIT_MB")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map_or(ITERATION_GROWTH_MAX, |mb| mb << 20)
    });
    assert!(
        growth <= max,
        "one input grew the heap by {growth} bytes (limit {max})"
    );
}
