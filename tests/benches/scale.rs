//! The real agent at issue 8's scale, on a real kernel's IPVS in the test VM:
//! 5,000 WeightedServices and 50,000 endpoints; edit → kernel, an agent
//! restart with edits made while it was down, memory, idle CPU (per thread),
//! the controller's status writes under pod label churn, and (`SCALE_PERF=1`
//! with `perf` in the VM) a profile of the agent. See `agent_at_scale`.
//! `make bench-scale` runs it; `SCALE_…` variables override the sizes.

#![recursion_limit = "256"]

mod agent_at_scale;

fn main() -> anyhow::Result<()> {
    agent_at_scale::main(agent_at_scale::Preset {
        name: "scale",
        env_prefix: "SCALE",
        services: 5000,
        pods: 10,
        edits: 100,
        idle_seconds: 30,
        restart_edits: 50,
        churn_seconds: 30,
        // Issue 5's goals, which were set for 1,000 WeightedServices: here for comparison.
        goals: (100.0, 64.0, 1.0),
    })
}
