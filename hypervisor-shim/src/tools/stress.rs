//! `hypervisor-shim stress`: elasticity scenarios no unit test covers, each run as a real pool
//! of VMs, with invariants checked throughout from the shim's own accounting.
//!
//! Checks for every scenario: every VM exits with its expected code; never above burst; never
//! above the pool's capacity; min always held; no credit balance below zero by more than one
//! accounting tick; every reclaim answered within its grace or counted as a violation;
//! violations exactly where the scenario expects them; zero data-checksum errors (the guests
//! print `VERIFY data_errors=N`). Writes `DIR/report.json`, and per scenario an SVG plot, the
//! timeline and each VM's console.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

use serde_json::Value;

use crate::tools::plot::{self, PlotVm};
use elastic_config::{parse_memory_policy, parse_vcpu_policy};
use elastic_vmm::{
    Capacity, ConsoleMode, PolicyConfig, RunOptions, RunResult, RunSpec, TimelineOptions, VmConfig, VmResult, VmSpec,
};

/// Stress-suite failures (a scenario that runs but fails its checks is not an error).
#[derive(Debug, Error)]
pub enum StressError {
    /// No scenario has this name.
    #[error("no scenario named '{0}' (try --list)")]
    UnknownScenario(String),
    /// The output directory could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A scenario could not be started.
    #[error("scenario '{scenario}' could not start: {source}")]
    Start {
        /// The scenario.
        scenario: String,
        /// Why.
        source: elastic_vmm::RunError,
    },
}

/// One check of a scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it held.
    pub passed: bool,
    /// The figures behind it.
    pub detail: String,
}

/// One VM's outcome in a scenario.
#[derive(Debug, Clone, Serialize)]
pub struct VmOutcome {
    /// Its name.
    pub name: String,
    /// Its service.
    pub app: String,
    /// Exit code.
    pub exit_code: u8,
    /// Expected exit code.
    pub expected_exit_code: u8,
    /// Whether at least one violation is expected of it.
    pub violations_expected: bool,
    /// Violations counted.
    pub violations_seen: u64,
    /// Reclaims it received.
    pub reclaims: u64,
    /// Data errors it reported.
    pub data_errors: u64,
}

/// One scenario's report (an entry of `report.json`).
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    /// Its name.
    pub scenario: String,
    /// Whether every check held.
    pub passed: bool,
    /// The checks.
    pub checks: Vec<Check>,
    /// Violations expected (at least this many, over all VMs).
    pub violations_expected: u64,
    /// Violations counted over all VMs.
    pub violations_seen: u64,
    /// Data errors over all VMs.
    pub data_errors: u64,
    /// Per VM.
    pub vms: Vec<VmOutcome>,
    /// Wall time, ms.
    pub wall_ms: u64,
    /// The plot written.
    pub plot: String,
}

/// A VM of a scenario, before it becomes a [`VmSpec`].
struct VmPlan {
    name: &'static str,
    app: &'static str,
    args: Vec<String>,
    vcpus: &'static str,
    memory: &'static str,
    budget: [f64; 2],
    refill: [f64; 2],
    opts: Vec<(&'static str, &'static str)>,
    weight: u64,
    expect_violation: bool,
}

impl VmPlan {
    fn new(name: &'static str, app: &'static str, args: &[String], vcpus: &'static str, memory: &'static str) -> Self {
        VmPlan {
            name,
            app,
            args: args.to_vec(),
            vcpus,
            memory,
            budget: [20.0, 20.0],
            refill: [2.0, 2.0],
            opts: Vec::new(),
            weight: 1,
            expect_violation: false,
        }
    }
}

/// A scenario.
struct Scenario {
    name: &'static str,
    about: &'static str,
    capacity: Capacity,
    vms: Vec<VmPlan>,
    /// At least one reclaim must happen.
    expect_reclaim: bool,
}

const GIB: u64 = 1 << 30;

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The scenarios; `short` gives the small versions the integration tests run.
fn scenarios(short: bool) -> Vec<Scenario> {
    let n = |long: u64, small: u64| if short { small } else { long }.to_string();
    let unlimited = Capacity::UNLIMITED;
    vec![
        Scenario {
            name: "ramp",
            about: "one VM ramps CPU and memory load up to burst and back down",
            capacity: unlimited,
            vms: vec![VmPlan::new(
                "ramp",
                "load",
                &args(&["ramp", &n(2, 1), "120", "8", "192"]),
                "1:2:4",
                "64M:192M:384M",
            )],
            expect_reclaim: false,
        },
        Scenario {
            name: "square-wave",
            about: "one VM alternates full load and idleness",
            capacity: unlimited,
            vms: vec![VmPlan::new(
                "square",
                "load",
                &args(&["square", &n(5, 2), "120", "8", "192"]),
                "1:2:4",
                "64M:192M:384M",
            )],
            expect_reclaim: false,
        },
        Scenario {
            name: "credit-exhaustion",
            about: "a small burst budget runs out; the guest cooperates with every reclaim",
            capacity: unlimited,
            vms: vec![VmPlan {
                budget: [0.2, 0.01],
                refill: [0.5, 0.02],
                // The guest keeps the vCPUs it took (no shedding when, on a small host, four
                // get no more done than three): the scenario is about the burst credit.
                opts: vec![("vcpu.down_busy", "0")],
                ..VmPlan::new(
                    "thrifty",
                    "load",
                    &args(&["square", &n(5, 3), "150", "8", "192"]),
                    "1:2:4",
                    "64M:128M:384M",
                )
            }],
            expect_reclaim: true,
        },
        Scenario {
            name: "non-cooperative",
            about: "one VM ignores reclaims and is enforced; its neighbours are unaffected",
            capacity: Capacity { vcpus: 10, memory: 2 * GIB },
            vms: vec![
                VmPlan {
                    budget: [0.1, 0.01],
                    refill: [0.1, 0.01],
                    opts: vec![("elastic.cooperate", "off"), ("vcpu.down_busy", "0")],
                    expect_violation: true,
                    ..VmPlan::new(
                        "greedy",
                        "load",
                        &args(&["square", &n(4, 2), "300", "8", "192"]),
                        "1:2:4",
                        "64M:128M:384M",
                    )
                },
                VmPlan::new("steady", "cpu-burst", &args(&[&n(3, 1)]), "1:3:3", "64M:64M:64M"),
                VmPlan::new("tidy", "mem-wave", &args(&[&n(2, 1), "128", "32", "50"]), "1:1:1", "64M:256M:384M"),
            ],
            expect_reclaim: true,
        },
        Scenario {
            name: "contended-pool",
            about: "three VMs burst at once in a pool smaller than their combined burst",
            capacity: Capacity { vcpus: 6, memory: 768 << 20 },
            vms: ["a", "b", "c"]
                .into_iter()
                .map(|name| {
                    VmPlan::new(name, "load", &args(&["ramp", &n(2, 1), "100", "8", "160"]), "1:2:4", "64M:192M:320M")
                })
                .collect(),
            expect_reclaim: false,
        },
        Scenario {
            name: "churn",
            about: "thousands of vCPU up/down and memory grant/release cycles in two VMs",
            capacity: Capacity { vcpus: 8, memory: GIB },
            vms: vec![
                VmPlan::new("vcpus", "vcpu-churn", &args(&[&n(3000, 400)]), "1:4:4", "64M:64M:64M"),
                VmPlan::new("memory", "mem-churn", &args(&[&n(600, 80)]), "1:4:4", "64M:256M:512M"),
            ],
            expect_reclaim: false,
        },
    ]
}

/// Names and descriptions of the scenarios.
pub fn list() -> Vec<(&'static str, &'static str)> {
    scenarios(false).iter().map(|s| (s.name, s.about)).collect()
}

fn spec_for(s: &Scenario, kernel: &Path, out: &Path) -> RunSpec {
    let vms = s
        .vms
        .iter()
        .map(|v| {
            let mut config = VmConfig::new(v.name, v.app);
            config.guest.args = v.args.clone();
            config.guest.log_level = "warn".into();
            config.guest.options = v.opts.iter().map(|(k, val)| (k.to_string(), val.to_string())).collect();
            // The scenario tables are static and validated by the unit tests.
            config.resources.vcpus = parse_vcpu_policy(v.vcpus).unwrap_or(elastic_config::Policy::fixed(1));
            config.resources.memory = parse_memory_policy(v.memory).unwrap_or(elastic_config::Policy::fixed(64 << 20));
            config.resources.policy = PolicyConfig { budget: v.budget, refill: v.refill, ..PolicyConfig::default() };
            config.resources.weight = v.weight;
            config.lifecycle.timeout = Some(Duration::from_secs(300));
            VmSpec::new(config, kernel.to_path_buf(), 0)
        })
        .collect();
    RunSpec {
        vms,
        capacity: s.capacity,
        options: RunOptions {
            timeline: TimelineOptions { file: Some(out.join(format!("{}.timeline.jsonl", s.name))), keep: true },
            console: ConsoleMode::Capture { echo: false },
            api_sock: None,
            seccomp: true,
        },
        on_vm_end: None,
    }
}

/// `VERIFY data_errors=N` from a console, if printed.
fn data_errors(output: &str) -> Option<u64> {
    output.lines().rev().find_map(|l| l.trim().strip_prefix("VERIFY data_errors=").and_then(|v| v.trim().parse().ok()))
}

fn check(checks: &mut Vec<Check>, name: &str, passed: bool, detail: String) {
    checks.push(Check { name: name.to_string(), passed, detail });
}

/// A VM's summary as JSON (the format `run --summary` writes).
fn summary_of(v: &VmResult) -> Value {
    serde_json::to_value(v.summary(0)).unwrap_or(Value::Null)
}

/// Evaluates a finished scenario.
fn evaluate(s: &Scenario, result: &RunResult) -> (Vec<Check>, Vec<VmOutcome>) {
    let mut checks = Vec::new();
    let mut outcomes = Vec::new();
    for (plan, vm) in s.vms.iter().zip(result.vms()) {
        let output = vm.output.clone().unwrap_or_default();
        outcomes.push(VmOutcome {
            name: plan.name.to_string(),
            app: plan.app.to_string(),
            exit_code: vm.outcome().exit_code(),
            expected_exit_code: vm.spec.expect_exit,
            violations_expected: plan.expect_violation,
            violations_seen: vm.violations(),
            reclaims: vm.reclaims(),
            data_errors: data_errors(&output).unwrap_or(u64::MAX),
        });
    }
    let summaries: Vec<(&VmResult, Value)> = result.vms().iter().map(|v| (v, summary_of(v))).collect();
    let all = |f: &dyn Fn(&VmResult, &Value) -> bool| summaries.iter().all(|(v, j)| f(v, j));
    let per_vm = |f: &dyn Fn(&VmResult, &Value) -> String| {
        summaries.iter().map(|(v, j)| format!("{}: {}", v.spec.config.name(), f(v, j))).collect::<Vec<_>>().join("; ")
    };
    let n = |j: &Value, path: &[&str]| path.iter().fold(j, |v, k| &v[*k]).as_u64().unwrap_or(u64::MAX);
    let f = |j: &Value, path: &[&str]| path.iter().fold(j, |v, k| &v[*k]).as_f64().unwrap_or(f64::NAN);
    check(
        &mut checks,
        "every VM exits with its expected code",
        all(&|v, _| v.as_expected()),
        per_vm(&|v, _| format!("exit {} (expected {})", v.outcome().exit_code(), v.spec.expect_exit)),
    );
    check(
        &mut checks,
        "never above burst",
        all(&|v, j| {
            let r = &v.spec.config.resources;
            n(j, &["invariants", "above_burst"]) == 0
                && n(j, &["vcpus", "peak"]) <= r.vcpus.burst
                && n(j, &["memory_bytes", "peak"]) <= r.memory.burst
        }),
        per_vm(&|v, j| {
            let r = &v.spec.config.resources;
            format!(
                "peak {} vCPUs / {} MiB, burst {} / {} MiB, {} breaches in {} checks",
                n(j, &["vcpus", "peak"]),
                n(j, &["memory_bytes", "peak"]) >> 20,
                r.vcpus.burst,
                r.memory.burst >> 20,
                n(j, &["invariants", "above_burst"]),
                n(j, &["invariants", "checks"])
            )
        }),
    );
    let (cap, peak) = result.pool_use();
    check(
        &mut checks,
        "never above pool capacity",
        all(&|_, j| n(j, &["invariants", "above_capacity"]) == 0) && peak[0] <= cap.vcpus && peak[1] <= cap.memory,
        format!(
            "pool peak {} vCPU slots / {} MiB of {} / {}",
            peak[0],
            peak[1] >> 20,
            if cap.vcpus == u64::MAX { "unlimited".to_string() } else { cap.vcpus.to_string() },
            if cap.memory == u64::MAX { "unlimited".to_string() } else { format!("{} MiB", cap.memory >> 20) }
        ),
    );
    check(
        &mut checks,
        "min always held",
        all(&|v, j| {
            n(j, &["invariants", "below_min"]) == 0
                && n(j, &["memory_bytes", "final"]) >= v.spec.config.resources.memory.min
        }),
        per_vm(&|_, j| format!("{} breaches", n(j, &["invariants", "below_min"]))),
    );
    check(
        &mut checks,
        "credit never below zero by more than one tick",
        all(&|_, j| n(j, &["invariants", "credit_overdrawn"]) == 0),
        per_vm(&|_, j| {
            format!(
                "lowest {:.3} vCPU-s / {:.3} GiB-s",
                f(j, &["policy", "vcpus", "credit_lowest"]),
                f(j, &["policy", "memory", "credit_lowest"])
            )
        }),
    );
    check(
        &mut checks,
        "every reclaim answered within grace or counted as a violation",
        all(&|v, _| v.reclaims_settled()),
        per_vm(&|_, j| {
            ["vcpus", "memory"]
                .iter()
                .map(|r| {
                    format!(
                        "{r} {} reclaims = {} in grace + {} violations",
                        n(j, &["policy", r, "reclaims"]),
                        n(j, &["policy", r, "answered_in_grace"]),
                        n(j, &["policy", r, "violations"])
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        }),
    );
    check(
        &mut checks,
        "violations where expected, and only there",
        outcomes.iter().all(|o| if o.violations_expected { o.violations_seen >= 1 } else { o.violations_seen == 0 }),
        outcomes
            .iter()
            .map(|o| {
                format!(
                    "{}: {} (expected {})",
                    o.name,
                    o.violations_seen,
                    if o.violations_expected { ">= 1" } else { "0" }
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
    );
    if s.expect_reclaim {
        let reclaims: u64 = outcomes.iter().map(|o| o.reclaims).sum();
        check(&mut checks, "reclaims happened", reclaims >= 1, format!("{reclaims} reclaims"));
    }
    check(
        &mut checks,
        "zero data-checksum errors",
        outcomes.iter().all(|o| o.data_errors == 0),
        outcomes
            .iter()
            .map(|o| {
                let e =
                    if o.data_errors == u64::MAX { "no VERIFY line".to_string() } else { o.data_errors.to_string() };
                format!("{}: {e}", o.name)
            })
            .collect::<Vec<_>>()
            .join("; "),
    );
    (checks, outcomes)
}

/// Runs the named scenarios (`all` for every one) and writes the report into `out`.
pub fn run(names: &[String], short: bool, out: &Path, kernel: &Path) -> Result<Vec<ScenarioReport>, StressError> {
    let write_err = |path: &Path, source| StressError::Write { path: path.display().to_string(), source };
    std::fs::create_dir_all(out).map_err(|e| write_err(out, e))?;
    let all = scenarios(short);
    let chosen: Vec<&Scenario> = if names.iter().any(|n| n == "all") {
        all.iter().collect()
    } else {
        let mut v = Vec::new();
        for n in names {
            v.push(all.iter().find(|s| s.name == n).ok_or_else(|| StressError::UnknownScenario(n.clone()))?);
        }
        v
    };
    let bar = {
        use std::io::IsTerminal;
        std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(chosen.len() as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] scenario {pos}/{len}: {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            b.enable_steady_tick(Duration::from_millis(200));
            b
        })
    };
    let mut reports = Vec::new();
    for s in chosen {
        if let Some(b) = &bar {
            b.set_message(s.name);
        } else {
            eline!("stress: {} — {}", s.name, s.about);
        }
        let started = Instant::now();
        let spec = spec_for(s, kernel, out);
        let result = elastic_vmm::run(&spec, started)
            .map_err(|source| StressError::Start { scenario: s.name.to_string(), source })?;
        let (checks, vms) = evaluate(s, &result);
        for v in result.vms() {
            let log = out.join(format!("{}-{}.log", s.name, v.spec.config.name()));
            std::fs::write(&log, v.output.clone().unwrap_or_default()).map_err(|e| write_err(&log, e))?;
        }
        let svg: PathBuf = out.join(format!("{}.svg", s.name));
        let plot_vms: Vec<PlotVm> = result.vms().iter().map(|v| PlotVm::of(&v.spec.config)).collect();
        let mut checks = checks;
        if let Err(e) = plot::render(&svg, &format!("stress: {}", s.name), &result.timeline_lines(), &plot_vms) {
            checks.push(Check { name: "plot written".into(), passed: false, detail: e.to_string() });
        }
        let report = ScenarioReport {
            scenario: s.name.to_string(),
            passed: checks.iter().all(|c| c.passed),
            violations_expected: vms.iter().filter(|v| v.violations_expected).count() as u64,
            violations_seen: vms.iter().map(|v| v.violations_seen).sum(),
            data_errors: vms.iter().map(|v| if v.data_errors == u64::MAX { 0 } else { v.data_errors }).sum(),
            checks,
            vms,
            wall_ms: started.elapsed().as_millis() as u64,
            plot: svg.display().to_string(),
        };
        let line = format!(
            "stress: {:<18} {} ({} ms, {} violations seen, {} expected)",
            report.scenario,
            if report.passed { "passed" } else { "FAILED" },
            report.wall_ms,
            report.violations_seen,
            report.violations_expected
        );
        match &bar {
            Some(b) => {
                b.println(line);
                b.inc(1);
            }
            None => eline!("{line}"),
        }
        if !report.passed {
            for c in report.checks.iter().filter(|c| !c.passed) {
                eline!("stress:   failed check '{}': {}", c.name, c.detail);
            }
        }
        reports.push(report);
        let path = out.join("report.json");
        elastic_vmm::write_json(&reports, &path).map_err(|e| write_err(&path, e))?;
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_tables_are_valid() {
        for short in [false, true] {
            for s in scenarios(short) {
                assert!(!s.vms.is_empty(), "{}", s.name);
                for v in &s.vms {
                    parse_vcpu_policy(v.vcpus).unwrap_or_else(|e| panic!("{}: {e}", s.name));
                    parse_memory_policy(v.memory).unwrap_or_else(|e| panic!("{}: {e}", s.name));
                }
            }
        }
        let names: Vec<_> = list().into_iter().map(|(n, _)| n).collect();
        for required in ["ramp", "square-wave", "credit-exhaustion", "non-cooperative", "contended-pool", "churn"] {
            assert!(names.contains(&required), "{required}");
        }
    }

    #[test]
    fn verify_lines_are_read() {
        assert_eq!(data_errors("x\nVERIFY data_errors=0\n"), Some(0));
        assert_eq!(data_errors("VERIFY data_errors=3"), Some(3));
        assert_eq!(data_errors("nothing"), None);
    }
}
