//! What `std` would provide on wasm, without importing anything from the host.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::Cell;

/// The host makes a fresh instance for every evaluation and drops it after, so
/// the guest never needs memory back: an arena (a bump pointer over linear
/// memory, grown with `memory.grow`) is the fastest allocator there is. Freeing
/// or growing the most recent allocation is done in place, so a growing `Vec`
/// does not leave copies behind. The host's memory limit bounds the total.
#[global_allocator]
static ALLOCATOR: Arena = Arena { next: Cell::new(0), end: Cell::new(0) };

struct Arena {
    next: Cell<usize>,
    end: Cell<usize>,
}

// A wasm32 guest has one thread.
unsafe impl Sync for Arena {}

const PAGE: usize = 65536;

unsafe extern "C" {
    /// Where the heap starts, after data and the stack; provided by wasm-ld.
    static __heap_base: u8;
}

impl Arena {
    /// Make `[next, next + size)` available, growing memory if needed.
    fn reserve(&self, start: usize, size: usize) -> bool {
        let Some(new_next) = start.checked_add(size) else { return false };
        if new_next > self.end.get() {
            let pages = (new_next - self.end.get()).div_ceil(PAGE).max(16);
            if core::arch::wasm32::memory_grow(0, pages) == usize::MAX {
                return false;
            }
            self.end.set(self.end.get() + pages * PAGE);
        }
        self.next.set(new_next);
        true
    }

    fn init(&self) {
        if self.next.get() == 0 {
            self.next.set(core::ptr::addr_of!(__heap_base) as usize);
            self.end.set(core::arch::wasm32::memory_size(0) * PAGE);
        }
    }
}

unsafe impl GlobalAlloc for Arena {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.init();
        let start = (self.next.get() + layout.align() - 1) & !(layout.align() - 1);
        if self.reserve(start, layout.size()) { start as *mut u8 } else { core::ptr::null_mut() }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if ptr as usize + layout.size() == self.next.get() {
            self.next.set(ptr as usize);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if ptr as usize + layout.size() == self.next.get() && self.reserve(ptr as usize, new_size) {
            return ptr;
        }
        let new = unsafe { self.alloc(Layout::from_size_align_unchecked(new_size, layout.align())) };
        if !new.is_null() {
            unsafe { core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
        }
        new
    }
}

/// A panic traps; the host reports the trap against the policy and keeps the last
/// good weights. (Printing the message would need a WASI import.)
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    core::arch::wasm32::unreachable()
}

/// The component model's allocation hook: the host calls it to place arguments
/// in guest memory. On wasm32-wasip2 `std` would export it; a `no_std` guest must.
///
/// # Safety
/// Called by the canonical ABI with a pointer/size pair it got from this function.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cabi_realloc(old_ptr: *mut u8, old_len: usize, align: usize, new_len: usize) -> *mut u8 {
    use alloc::alloc::{alloc, realloc, Layout};
    if new_len == 0 {
        return align as *mut u8;
    }
    let ptr = unsafe {
        if old_len == 0 {
            alloc(Layout::from_size_align_unchecked(new_len, align))
        } else {
            realloc(old_ptr, Layout::from_size_align_unchecked(old_len, align), new_len)
        }
    };
    if ptr.is_null() {
        // Out of memory (the host's limit): trap rather than return null.
        core::arch::wasm32::unreachable();
    }
    ptr
}

// memcpy, memcmp and friends come from wasi-libc's static libc.a (in the
// target's self-contained directory). Only those pure functions are pulled in;
// nothing in them imports from the host.
#[link(name = "c")]
unsafe extern "C" {}
