//! The wiping global allocator: `System`, plus zeroing of every block on free (and of the old
//! block when `realloc` moves data) while a process-wide switch is on. It is how transient
//! copies of secrets — header values hyper copies per request, buffers rustls frees — stop
//! existing once their owner lets go, instead of lingering in free heap memory.
//!
//! Installed by the binary:
//! `#[global_allocator] static GLOBAL: sprint_sidecar::secret::WipingAllocator = sprint_sidecar::secret::WipingAllocator;`

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};

static WIPE_ON_FREE: AtomicBool = AtomicBool::new(false);

/// Turns zeroing of freed heap memory on or off for the whole process (config switch; off by
/// default until the binary decides, because it costs one `memset` per free).
pub fn set_wipe_on_free(enabled: bool) {
    WIPE_ON_FREE.store(enabled, Ordering::Relaxed);
}

/// Whether freed heap memory is zeroed now.
pub fn wipe_on_free() -> bool {
    WIPE_ON_FREE.load(Ordering::Relaxed)
}

/// `System`, zeroing blocks as they are freed while [`set_wipe_on_free`] is on.
///
/// With wiping on, `realloc` always allocates, copies, wipes and frees the old block, so no
/// stale copy is left behind by an in-place move the underlying allocator might make.
#[derive(Debug, Clone, Copy, Default)]
pub struct WipingAllocator;

// SAFETY: every method forwards to `System` with the caller's layout; the extra work only
// writes zeroes inside a block the caller owns and is about to hand back, so the GlobalAlloc
// contract (valid, suitably aligned, non-overlapping blocks) is exactly System's.
unsafe impl GlobalAlloc for WipingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours; the caller guarantees a non-zero-sized layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        // SAFETY: the caller guarantees `block` was allocated by us with `layout`, so it is
        // valid for `layout.size()` writes until it is returned to System just below.
        unsafe { dealloc_wiping(&System, block, layout, wipe_on_free()) }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees the GlobalAlloc::realloc preconditions; we pass them on.
        unsafe { realloc_wiping(&System, block, layout, new_size, wipe_on_free()) }
    }
}

/// Frees `block` through `inner`, zeroing it first when `wipe` is set.
///
/// # Safety
/// `block` must have been allocated by `inner` with `layout` and not freed yet.
unsafe fn dealloc_wiping<A: GlobalAlloc>(inner: &A, block: *mut u8, layout: Layout, wipe: bool) {
    if wipe {
        // SAFETY: the block is ours for `layout.size()` bytes until the dealloc below.
        unsafe { wipe_bytes(block, layout.size()) };
    }
    // SAFETY: forwarded from our caller.
    unsafe { inner.dealloc(block, layout) }
}

/// `realloc` through `inner`; with `wipe`, moves the data itself so the old block can be zeroed.
///
/// # Safety
/// The `GlobalAlloc::realloc` preconditions for `inner`.
unsafe fn realloc_wiping<A: GlobalAlloc>(
    inner: &A,
    block: *mut u8,
    layout: Layout,
    new_size: usize,
    wipe: bool,
) -> *mut u8 {
    if !wipe {
        // SAFETY: forwarded from our caller.
        return unsafe { inner.realloc(block, layout, new_size) };
    }
    // SAFETY: realloc's contract guarantees `new_size`, rounded up to `layout.align()`, does
    // not overflow isize, which is what from_size_align_unchecked requires.
    let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
    // SAFETY: `new_size` is non-zero by realloc's contract.
    let moved = unsafe { inner.alloc(new_layout) };
    if moved.is_null() {
        // realloc failure leaves the old block untouched and owned by the caller.
        return moved;
    }
    // SAFETY: both blocks are valid for the copied length and distinct allocations; the old
    // block is then wiped and freed exactly once.
    unsafe {
        ptr::copy_nonoverlapping(block, moved, layout.size().min(new_size));
        dealloc_wiping(inner, block, layout, true);
    }
    moved
}

/// Zeroes `len` bytes at `start` in a way the optimiser may not remove, even when the memory
/// is freed right after (the dead-store elimination that defeats a plain `memset`).
///
/// # Safety
/// `start` must be valid for `len` bytes of writes.
pub(crate) unsafe fn wipe_bytes(start: *mut u8, len: usize) {
    if len == 0 {
        return;
    }
    // SAFETY: the caller guarantees `start..start + len` is writable.
    unsafe { ptr::write_bytes(start, 0, len) };
    // SAFETY: an empty asm statement. It receives the pointer and, lacking `nomem`, must be
    // assumed to read the memory behind it, so the zeroes above are observable and cannot be
    // elided (the technique of BoringSSL's OPENSSL_cleanse). It touches no register or flag.
    unsafe {
        std::arch::asm!("/* {0} */", in(reg) start, options(nostack, readonly, preserves_flags));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A System wrapper that records, on each dealloc, whether the block arrived zeroed.
    struct Inspecting {
        freed_all_zero: Mutex<Vec<bool>>,
    }

    // SAFETY: forwards to System; inspection only reads the block before freeing it.
    unsafe impl GlobalAlloc for Inspecting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: forwarded.
            unsafe { System.alloc(layout) }
        }

        unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
            // SAFETY: the block is still allocated and readable for layout.size() bytes.
            let bytes = unsafe { std::slice::from_raw_parts(block, layout.size()) };
            let zero = bytes.iter().all(|&b| b == 0);
            self.freed_all_zero.lock().unwrap().push(zero);
            // SAFETY: forwarded.
            unsafe { System.dealloc(block, layout) }
        }
    }

    fn inspecting() -> Inspecting {
        Inspecting {
            freed_all_zero: Mutex::new(Vec::new()),
        }
    }

    fn filled_block(inner: &Inspecting, layout: Layout) -> *mut u8 {
        // SAFETY: non-zero layout; the block is filled within its size.
        unsafe {
            let block = inner.alloc(layout);
            assert!(!block.is_null());
            ptr::write_bytes(block, 0xA5, layout.size());
            block
        }
    }

    #[test]
    fn dealloc_zeroes_the_block_when_wiping() {
        let inner = inspecting();
        let layout = Layout::from_size_align(4096 + 17, 8).unwrap();
        let block = filled_block(&inner, layout);
        // SAFETY: allocated by `inner` with `layout`, freed once.
        unsafe { dealloc_wiping(&inner, block, layout, true) };
        let block = filled_block(&inner, layout);
        // SAFETY: as above.
        unsafe { dealloc_wiping(&inner, block, layout, false) };
        assert_eq!(*inner.freed_all_zero.lock().unwrap(), vec![true, false]);
    }

    #[test]
    fn realloc_wipes_the_old_block_and_keeps_the_data() {
        let inner = inspecting();
        let layout = Layout::from_size_align(64, 8).unwrap();
        let block = filled_block(&inner, layout);
        // SAFETY: allocated by `inner` with `layout`; the new block is freed below.
        unsafe {
            let grown = realloc_wiping(&inner, block, layout, 256, true);
            assert!(
                std::slice::from_raw_parts(grown, 64)
                    .iter()
                    .all(|&b| b == 0xA5)
            );
            let shrunk = realloc_wiping(&inner, grown, layout_of(256), 16, true);
            assert!(
                std::slice::from_raw_parts(shrunk, 16)
                    .iter()
                    .all(|&b| b == 0xA5)
            );
            dealloc_wiping(&inner, shrunk, layout_of(16), true);
        }
        assert_eq!(
            *inner.freed_all_zero.lock().unwrap(),
            vec![true, true, true]
        );
    }

    fn layout_of(size: usize) -> Layout {
        Layout::from_size_align(size, 8).unwrap()
    }

    #[test]
    fn wipe_bytes_zeroes_exactly_the_range() {
        let mut bytes = [0xFFu8; 32];
        // SAFETY: 8..24 is inside the array.
        unsafe { wipe_bytes(bytes.as_mut_ptr().add(8), 16) };
        assert!(bytes[..8].iter().all(|&b| b == 0xFF));
        assert!(bytes[8..24].iter().all(|&b| b == 0));
        assert!(bytes[24..].iter().all(|&b| b == 0xFF));
    }

    #[test]
    fn switch_toggles() {
        // The test binary installs WipingAllocator globally (see buffer tests); flipping the
        // switch while other tests allocate is harmless either way.
        let before = wipe_on_free();
        set_wipe_on_free(true);
        assert!(wipe_on_free());
        let data = vec![7u8; 100_000];
        drop(data);
        set_wipe_on_free(before);
    }
}
