//! A per-shard pool of page-aligned, mlock'ed transfer buffers: the only memory LFS transfers
//! use for object bytes. Its size bounds a shard's transfer memory whatever the object sizes and
//! concurrency: when every buffer is out, a transfer waits for one (backpressure) instead of
//! allocating. Locked pages never swap, so a busy node's latency does not depend on the pager.
//!
//! [`PooledBuf`] implements monoio's owned-buffer traits, so sockets and files read into and
//! write from pool memory directly; it returns itself to the pool when dropped.

use std::alloc::Layout;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

use crate::metrics::METRICS;

const PAGE: usize = 4096;

/// One aligned allocation, locked in memory when the kernel allows it.
struct Pinned {
    ptr: NonNull<u8>,
    layout: Layout,
    locked: bool,
}

static MLOCK_WARNED: AtomicBool = AtomicBool::new(false);

impl Pinned {
    fn new(size: usize) -> Option<Self> {
        let layout = Layout::from_size_align(size.max(PAGE), PAGE).ok()?;
        // SAFETY: layout has a non-zero size.
        let ptr = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
        // SAFETY: ptr/len describe the allocation we just made.
        let locked = unsafe { libc::mlock(ptr.as_ptr().cast(), layout.size()) } == 0;
        if !locked && !MLOCK_WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                error = %std::io::Error::last_os_error(),
                "cannot mlock the LFS buffer pool; it still works but may swap. Raise the memlock \
                 limit to at least lfs.buffer_size * lfs.buffers_per_shard * shards (ulimit -l, \
                 LimitMEMLOCK= in the systemd unit) or grant CAP_IPC_LOCK"
            );
        }
        Some(Self {
            ptr,
            layout,
            locked,
        })
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: unlocking and freeing exactly what new() allocated.
        unsafe {
            if self.locked {
                libc::munlock(self.ptr.as_ptr().cast(), self.layout.size());
            }
            std::alloc::dealloc(self.ptr.as_ptr(), self.layout);
        }
    }
}

struct Inner {
    free: RefCell<Vec<Pinned>>,
    waiters: RefCell<VecDeque<Waker>>,
    buffer_size: usize,
    total: usize,
    waits: Cell<u64>,
}

/// A shard's buffer pool. Cheap to clone (shared handle).
#[derive(Clone)]
pub struct BufferPool(Rc<Inner>);

impl BufferPool {
    /// Allocates `count` buffers of `buffer_size` bytes (rounded up to whole pages) up front.
    pub fn new(buffer_size: usize, count: usize) -> Self {
        let size = buffer_size.div_ceil(PAGE) * PAGE;
        let free: Vec<Pinned> = (0..count).filter_map(|_| Pinned::new(size)).collect();
        let total = free.len();
        Self(Rc::new(Inner {
            free: RefCell::new(free),
            waiters: RefCell::new(VecDeque::new()),
            buffer_size: size,
            total,
            waits: Cell::new(0),
        }))
    }

    pub fn buffer_size(&self) -> usize {
        self.0.buffer_size
    }

    /// (free buffers, total buffers, times a transfer had to wait).
    pub fn stats(&self) -> (usize, usize, u64) {
        (self.0.free.borrow().len(), self.0.total, self.0.waits.get())
    }

    /// Whether a transfer is waiting for a buffer: a transfer holding more than one gives the
    /// extras back then, so overlap never costs another transfer its start.
    pub fn contended(&self) -> bool {
        !self.0.waiters.borrow().is_empty()
    }

    /// Takes a buffer, waiting while none is free.
    pub fn acquire(&self) -> Acquire<'_> {
        Acquire {
            pool: self,
            counted: false,
        }
    }

    /// Takes a buffer only if one is free right now.
    pub fn try_acquire(&self) -> Option<PooledBuf> {
        let buf = self.0.free.borrow_mut().pop()?;
        METRICS.lfs.pool_in_use.inc();
        Some(PooledBuf {
            buf: Some(buf),
            len: 0,
            pool: self.clone(),
        })
    }

    fn give_back(&self, buf: Pinned) {
        METRICS.lfs.pool_in_use.dec();
        self.0.free.borrow_mut().push(buf);
        if let Some(w) = self.0.waiters.borrow_mut().pop_front() {
            w.wake();
        }
    }
}

pub struct Acquire<'a> {
    pool: &'a BufferPool,
    counted: bool,
}

impl Future for Acquire<'_> {
    type Output = PooledBuf;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<PooledBuf> {
        if let Some(buf) = self.pool.try_acquire() {
            return Poll::Ready(buf);
        }
        if !self.counted {
            self.counted = true;
            self.pool.0.waits.set(self.pool.0.waits.get() + 1);
            METRICS.lfs.pool_waits.inc();
        }
        self.pool
            .0
            .waiters
            .borrow_mut()
            .push_back(cx.waker().clone());
        Poll::Pending
    }
}

/// A buffer on loan from the pool; `len` bytes of it are filled.
pub struct PooledBuf {
    buf: Option<Pinned>,
    len: usize,
    pool: BufferPool,
}

impl PooledBuf {
    pub fn capacity(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.layout.size())
    }

    pub fn filled(&self) -> &[u8] {
        match &self.buf {
            // SAFETY: the first `len` bytes are initialised (zeroed at allocation, then written).
            Some(b) => unsafe { std::slice::from_raw_parts(b.ptr.as_ptr(), self.len) },
            None => &[],
        }
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Copies as much of `data` as fits; returns how much.
    pub fn fill_from(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.capacity() - self.len);
        if let Some(b) = &self.buf {
            // SAFETY: the destination range lies inside the allocation and cannot overlap `data`
            // (pool memory is never handed out twice).
            unsafe {
                std::ptr::copy_nonoverlapping(data.as_ptr(), b.ptr.as_ptr().add(self.len), n);
            }
        }
        self.len += n;
        n
    }

    /// Limits the filled length (e.g. to the bytes a response still owes).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.pool.give_back(b);
        }
    }
}

// SAFETY: the pointer is valid for the buffer's lifetime, which the owned PooledBuf keeps alive
// while monoio holds it for an in-flight operation.
unsafe impl monoio::buf::IoBuf for PooledBuf {
    fn read_ptr(&self) -> *const u8 {
        self.buf
            .as_ref()
            .map_or(std::ptr::null(), |b| b.ptr.as_ptr().cast_const())
    }
    fn bytes_init(&self) -> usize {
        self.len
    }
}

// SAFETY: as above; monoio writes at most bytes_total() bytes at write_ptr() and then reports how
// many through set_init.
unsafe impl monoio::buf::IoBufMut for PooledBuf {
    fn write_ptr(&mut self) -> *mut u8 {
        self.buf
            .as_ref()
            .map_or(std::ptr::null_mut(), |b| b.ptr.as_ptr())
    }
    fn bytes_total(&mut self) -> usize {
        self.capacity()
    }
    unsafe fn set_init(&mut self, pos: usize) {
        self.len = pos;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_bounded_and_returned() {
        let pool = BufferPool::new(10_000, 2);
        assert_eq!(pool.buffer_size(), 12_288);
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut a = pool.acquire().await;
            let b = pool.acquire().await;
            assert_eq!(a.read_ptr_addr() % PAGE, 0);
            assert_eq!(pool.stats().0, 0);
            assert_eq!(a.fill_from(&[7u8; 20_000]), 12_288);
            assert_eq!(a.filled().len(), 12_288);
            // A third transfer waits until one comes back.
            let waiter = monoio::spawn({
                let pool = pool.clone();
                async move { pool.acquire().await.capacity() }
            });
            monoio::time::sleep(std::time::Duration::from_millis(5)).await;
            assert_eq!(pool.stats().2, 1, "the third acquire had to wait");
            drop(b);
            assert_eq!(waiter.await, 12_288);
            drop(a);
        });
        assert_eq!(pool.stats().0, 2);
    }

    impl PooledBuf {
        fn read_ptr_addr(&self) -> usize {
            monoio::buf::IoBuf::read_ptr(self) as usize
        }
    }
}
