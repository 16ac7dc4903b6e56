//! The task pool checks shared by `tests/pool.rs` and `tests/pool_nospin.rs`.

use rsnorm::pool;
use std::sync::atomic::{AtomicUsize, Ordering};

fn run_all(bytes: usize, tasks: usize) {
    assert!(pool::worth_parallel(bytes));
    let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
    pool::for_each_task(tasks, true, |i| {
        hits[i].fetch_add(1, Ordering::Relaxed);
    });
    assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    let got = pool::map_tasks(tasks, true, |i| i * 3);
    assert_eq!(got, (0..tasks).map(|i| i * 3).collect::<Vec<_>>());
}

/// Every schedule check; run by `pool.rs` (helpers spinning) and `pool_nospin.rs`.
pub fn check_schedules() {
    for threads in [2, 3] {
        pool::set_num_threads(threads);
        for bytes in [pool::PARALLEL_MIN_BYTES, pool::SHARED_MAX_BYTES + 1] {
            for tasks in [2, 3, 7, 1000] {
                run_all(bytes, tasks);
            }
            // A task that starts a parallel call of its own (on a pool worker or the caller).
            pool::worth_parallel(bytes);
            let sums = pool::map_tasks(6, true, |i| {
                pool::worth_parallel(bytes);
                pool::map_tasks(50, true, move |j| i * 100 + j)
                    .iter()
                    .sum::<usize>()
            });
            let want: Vec<usize> = (0..6).map(|i| i * 100 * 50 + 49 * 50 / 2).collect();
            assert_eq!(sums, want);
            // A panic in any task reaches the caller, and the pool keeps working afterwards.
            for bad in [0, 999] {
                pool::worth_parallel(bytes);
                let r = std::panic::catch_unwind(|| {
                    pool::for_each_task(1000, true, |i| {
                        if i == bad {
                            panic!("task {i}");
                        }
                    })
                });
                assert!(r.is_err(), "threads {threads}, bytes {bytes}, bad {bad}");
                run_all(bytes, 100);
            }
            // Callers on several threads at once: the hot helpers are busy with one call while
            // the others post theirs, which then go to the rayon pool or run on the caller.
            std::thread::scope(|s| {
                for _ in 0..3 {
                    s.spawn(|| {
                        for tasks in [2, 5, 64] {
                            for _ in 0..50 {
                                run_all(bytes, tasks);
                            }
                        }
                    });
                }
            });
        }
    }
    pool::set_num_threads(0);
}
