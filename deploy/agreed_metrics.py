"""Metric names agreed with the branches that build the fleet (shared rate limit, PostgreSQL
store, circuit breaker): the alerts and the dashboard use them before src/metrics.rs of this
branch declares them. consistency.py and live_dashboard.py accept exactly these as pending;
once src/metrics.rs declares them they are checked like every other name."""

AGREED = {
    "dialer_rate_limit_configured",
    "dialer_rate_limit_effective",
    "dialer_rate_mode",
    "dialer_rate_mode_switches_total",
    "dialer_fleet_consumers",
    "dialer_decision_store_up",
    "dialer_decision_store_errors_total",
    "dialer_decision_claim_waits_total",
    "dialer_circuit_open",
    "dialer_circuit_opened_total",
}
