//! The data plane's event loops: `runtime.worker_threads` single-threaded tokio runtimes, one
//! per thread, the shape of nginx's worker processes. Loop 0 is the process's main runtime
//! (it also runs the admin listener and the background tasks); loops 1.. run on threads of
//! their own.
//!
//! Each loop owns a share of the pool's connections (slot `i` is driven by loop
//! `i % loops`) and of the client connections (the acceptor on loop 0 hands each new client
//! to the loop with the fewest). A request is sent on a connection of its own loop while one
//! can take it, so the hot path never crosses threads: no cross-thread wake-ups, no shared
//! run queue, which is what made tokio's work-stealing scheduler cost 1.2–1.4× the CPU per
//! request of one loop (README, Performance).
//!
//! ```text
//!  loop 0 (main thread)            loop 1 (thread sidecar-loop-1)
//!  acceptor ── clients ──┐         clients
//!  clients               │            │
//!  slots 1, 3 ──TLS──▶   └─ hand-off ─┘  slots 2, 4 ──TLS──▶ relay
//! ```

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// The loop this thread runs (0 on the main thread and on any thread that is not a loop).
pub fn current() -> usize {
    CURRENT.with(Cell::get)
}

/// The cores this process may use: `available_parallelism`, which counts the CPU affinity
/// mask and the cgroup CPU quota; 1 when it cannot tell.
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The running loops: handles to spawn on, and the threads of loops 1.. .
#[derive(Debug)]
pub struct EventLoops {
    handles: Vec<Handle>,
    /// Live client connections per loop, to hand a new one to the least busy.
    clients: Vec<AtomicUsize>,
    threads: Vec<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl EventLoops {
    /// `count` loops: the caller's runtime (which must be current) as loop 0, and
    /// `count - 1` new threads, each running a single-threaded runtime until [`Self::stop`].
    ///
    /// # Errors
    /// A runtime or thread that cannot be created.
    pub fn start(count: usize) -> std::io::Result<Self> {
        let mut handles = vec![Handle::current()];
        let mut threads = Vec::new();
        for index in 1..count.max(1) {
            let runtime = crate::busy_poll::loop_runtime().build()?;
            handles.push(runtime.handle().clone());
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("sidecar-loop-{index}"))
                .spawn(move || {
                    CURRENT.with(|c| c.set(index));
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                    // Dropping the runtime here cancels what is left on it (nothing, after a
                    // drain), outside any async context.
                })?;
            threads.push((stop, thread));
        }
        let clients = handles.iter().map(|_| AtomicUsize::new(0)).collect();
        Ok(EventLoops {
            handles,
            clients,
            threads,
        })
    }

    /// How many loops run.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Always false: there is at least loop 0.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Runs `task` on loop `index % len`.
    pub fn spawn_on<F>(&self, index: usize, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handles[index % self.handles.len()].spawn(task)
    }

    /// The loop with the fewest live client connections (the lowest index among equals),
    /// counted as taking one more; give it back with [`Self::client_closed`].
    pub fn assign_client(&self) -> usize {
        let (index, _) = self
            .clients
            .iter()
            .enumerate()
            .min_by_key(|(_, n)| n.load(Ordering::Relaxed))
            .unwrap_or((0, &self.clients[0]));
        self.clients[index].fetch_add(1, Ordering::Relaxed);
        index
    }

    /// A client connection of loop `index` has ended.
    pub fn client_closed(&self, index: usize) {
        if let Some(n) = self.clients.get(index) {
            n.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Stops loops 1.. and waits for their threads. Whatever still runs on them is dropped,
    /// so stop them after the data plane has drained.
    pub fn stop(&mut self) {
        for (stop, thread) in self.threads.drain(..) {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}

impl Drop for EventLoops {
    fn drop(&mut self) {
        for (stop, _) in self.threads.drain(..) {
            let _ = stop.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_their_loop_and_clients_go_to_the_least_busy() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async {
            let mut loops = EventLoops::start(3).expect("three loops");
            assert_eq!(loops.len(), 3);
            for index in 0..6 {
                let ran_on = loops.spawn_on(index, async { current() }).await;
                assert_eq!(ran_on.expect("the task ran"), index % 3);
            }
            assert_eq!(
                [0, 1, 2, 0].map(|_| loops.assign_client()),
                [0, 1, 2, 0],
                "the fewest clients first, the lowest index among equals"
            );
            loops.client_closed(1);
            assert_eq!(loops.assign_client(), 1);
            loops.stop();
        });
    }
}
