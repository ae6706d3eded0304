//! Convergence of the real agent at scale (issue 5), on a real kernel's IPVS in
//! the test VM: 1,000 WeightedServices and 10,000 endpoints; see
//! `agent_at_scale` for what is measured. `make bench-convergence` runs it;
//! `CONVERGENCE_…` variables override the sizes.

#![recursion_limit = "256"]

mod agent_at_scale;

fn main() -> anyhow::Result<()> {
    agent_at_scale::main(agent_at_scale::Preset {
        name: "convergence",
        env_prefix: "CONVERGENCE",
        services: 1000,
        pods: 10,
        edits: 100,
        idle_seconds: 30,
        restart_edits: 0,
        churn_seconds: 0,
        // Issue 5's goals: p99 ≤ 100 ms, RSS ≤ 64 MiB, idle CPU ≤ 1 % of a core.
        goals: (100.0, 64.0, 1.0),
    })
}
