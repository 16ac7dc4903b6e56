//! The checks of `pool.rs` with `RSNORM_SPIN_US=0`: hot helpers park at once and the caller
//! sleeps on its last helper instead of spinning (an integration test is a process of its own,
//! so the variable is set before the pool first reads it).

#[path = "common/pool_checks.rs"]
mod pool_checks;

#[test]
fn schedules_without_spinning() {
    std::env::set_var("RSNORM_SPIN_US", "0");
    pool_checks::check_schedules();
}
