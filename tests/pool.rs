//! The task pool's two schedules (shared with the caller for small calls, the pool alone for
//! large ones): every task runs exactly once, `map_tasks` keeps task order, nested calls and
//! panics in any participant behave, also with callers on several threads at once. One test
//! function: the thread count is process-global.

#[path = "common/pool_checks.rs"]
mod pool_checks;

#[test]
fn schedules_run_every_task_once_in_order_nest_and_propagate_panics() {
    // The helpers' spin budget is read once per process; `pool_nospin.rs` runs these with 0.
    pool_checks::check_schedules();
}
