"""The scale benchmark's bookkeeping (the runs themselves are `nox -s bench -- --phase scale`)."""

from __future__ import annotations

from typing import Any

from benchmarks.scale import Measured, cpu_between, report


def config(rate: float, others: float) -> dict[str, Any]:
    measured = Measured(settles=int(rate * 10), latencies=[0.01, 0.02])
    result = measured.summary(
        10.0, server=2.0, postgres=1.0, loadgen=1.0, machine=4.0 + 10 * others
    )
    return {**result, "conserved": True, "ran_out_of_payments": False}


def results(one: float, two: float, others: float) -> dict[str, Any]:
    configs = {"postgres": config(one, others), "postgres-2-nodes": config(two, others)}
    configs["postgres-2-nodes"]["speedup_over_one_node"] = two / one
    return {"machine": {"cpus": 2}, "configurations": configs, "written_to": "x.json"}


def test_cpu_per_settle_and_shares() -> None:
    r = config(100, 0.0)
    assert r["settles"] == 1000 and r["per_second"] == 100
    assert r["server_cpu_us_per_settle"] == 2000 and r["postgres_cpu_us_per_settle"] == 1000
    assert r["machine_busy_share"] == 0.2 and r["others_cores"] == 0.0
    assert not r["loadgen_bound"] and not r["machine_bound"]


def test_the_verdict_on_a_quiet_machine_and_beside_others() -> None:
    assert "1.60x (meets the target" in report(results(100, 160, 0.0))
    assert "1.20x (MISSES the target" in report(results(100, 120, 0.0))
    noisy = report(results(100, 160, 0.5))
    assert "NOT COMPARABLE: other programs used 0.50-0.50 cores" in noisy


def test_postgres_processes_that_started_meanwhile_count_whole() -> None:
    assert cpu_between({1: 1.0, 2: 5.0}, {1: 1.5, 2: 5.0, 3: 0.25}) == 0.75
