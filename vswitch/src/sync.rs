//! A spin lock for state a polling thread takes once per burst.
//!
//! Uncontended it costs one compare-and-swap and one store, no syscall; a waiter spins briefly,
//! then yields (on a busy 2-core machine the holder may be descheduled). The control thread
//! uses the same lock to change or hand over what it guards between bursts.
//!
//! A wait longer than [`LONG_WAIT`] is logged once, naming the caller: the holder is then a
//! polling thread stuck in a burst (the watchdog interrupts one blocked on a guest's eventfd),
//! and the log says where the rest of the switch is waiting for it.

use std::cell::UnsafeCell;
use std::ops::{Deref, DerefMut};
use std::panic::Location;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A wait for a lock this long is reported.
pub const LONG_WAIT: Duration = Duration::from_secs(1);

/// A value behind a spin lock.
#[derive(Default)]
pub struct Spin<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: `value` is only reached through a `SpinGuard`, which exists only while `locked` is
// held by its creator; T moves between threads, so it must be Send.
unsafe impl<T: Send> Sync for Spin<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for Spin<T> {}

/// Exclusive access to a `Spin`'s value.
pub struct SpinGuard<'a, T> {
    lock: &'a Spin<T>,
}

impl<T> Spin<T> {
    /// A lock around `value`.
    pub fn new(value: T) -> Self {
        Spin { locked: AtomicBool::new(false), value: UnsafeCell::new(value) }
    }

    /// Takes the lock if it is free.
    #[inline(always)]
    pub fn try_lock(&self) -> Option<SpinGuard<'_, T>> {
        // `then`, not `then_some`: a guard built eagerly on a failed attempt would be dropped
        // at once and release the lock its real holder still has.
        self.locked
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
            .then(|| SpinGuard { lock: self })
    }

    /// Takes the lock, waiting for its holder.
    #[inline]
    #[track_caller]
    pub fn lock(&self) -> SpinGuard<'_, T> {
        match self.try_lock() {
            Some(g) => g,
            None => self.lock_contended(Location::caller()),
        }
    }

    #[cold]
    fn lock_contended(&self, caller: &'static Location<'static>) -> SpinGuard<'_, T> {
        let mut spins = 0u32;
        let mut since: Option<Instant> = None;
        let mut reported = false;
        loop {
            if let Some(g) = self.try_lock() {
                if reported {
                    tracing::warn!(%caller, "got the lock after {:?}", since.map(|t| t.elapsed()));
                }
                return g;
            }
            spins = spins.wrapping_add(1);
            if spins < 64 {
                std::hint::spin_loop();
                continue;
            }
            std::thread::yield_now();
            // The clock only once per 64 yields: a contended wait stays cheap.
            if spins.is_multiple_of(64) && !reported {
                let t = *since.get_or_insert_with(Instant::now);
                if t.elapsed() > LONG_WAIT {
                    reported = true;
                    tracing::error!(
                        %caller,
                        lock = std::any::type_name::<T>(),
                        "waiting over {LONG_WAIT:?} for a lock a polling thread holds (still waiting)"
                    );
                }
            }
        }
    }
}

impl<T> Deref for SpinGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for SpinGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the lock, so this is the only reference.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.locked.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_failed_try_lock_leaves_the_holder_locked() {
        let l = Spin::new(0u32);
        let held = l.try_lock().expect("free lock");
        assert!(l.try_lock().is_none());
        assert!(l.try_lock().is_none(), "a failed attempt must not release the holder's lock");
        drop(held);
        assert!(l.try_lock().is_some());
    }

    #[test]
    fn test_lock_excludes_other_threads() {
        let l = std::sync::Arc::new(Spin::new(0u64));
        let ts: Vec<_> = (0..2)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    for _ in 0..100_000 {
                        *l.lock() += 1;
                    }
                })
            })
            .collect();
        for t in ts {
            t.join().unwrap();
        }
        assert_eq!(*l.lock(), 200_000);
    }
}
