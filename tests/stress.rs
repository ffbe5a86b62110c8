//! The stress suite's short scenarios, run one after another (they are timing-sensitive: a
//! cooperative guest must answer reclaims within the grace period).

mod common;

use common::*;

#[test]
fn every_stress_scenario_passes_its_invariants() {
    let dir = temp_dir("stress");
    let r = shim(&["stress", "--short", "--scenario", "all", "--out", dir.to_str().unwrap()]);
    r.expect_code(0);
    let report = read_json(&dir.join("report.json"));
    let scenarios = report.as_array().expect("a list");
    let names: Vec<_> = scenarios.iter().map(|s| s["scenario"].as_str().unwrap()).collect();
    assert_eq!(names, ["ramp", "square-wave", "credit-exhaustion", "non-cooperative", "contended-pool", "churn"]);
    for s in scenarios {
        let name = s["scenario"].as_str().unwrap();
        assert_eq!(s["passed"], true, "{name}: {s}");
        for key in ["checks", "violations_expected", "violations_seen", "data_errors"] {
            assert!(!s[key].is_null(), "{name} lacks {key}");
        }
        assert_eq!(s["data_errors"], 0, "{name}");
        assert!(s["checks"].as_array().unwrap().iter().all(|c| c["passed"] == true), "{name}");
        let svg = dir.join(format!("{name}.svg"));
        assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"), "{}", svg.display());
    }
    // The non-cooperative VM is enforced; its neighbours see no violation and finish.
    let nc = scenarios.iter().find(|s| s["scenario"] == "non-cooperative").unwrap();
    for vm in nc["vms"].as_array().unwrap() {
        if vm["name"] == "greedy" {
            assert!(vm["violations_seen"].as_u64().unwrap() >= 1, "{vm}");
        } else {
            assert_eq!(vm["violations_seen"], 0, "{vm}");
            assert_eq!(vm["exit_code"], 0, "{vm}");
            assert_eq!(vm["data_errors"], 0, "{vm}");
        }
    }
    // Credit exhaustion with a cooperating guest: reclaims, no violations.
    let ce = scenarios.iter().find(|s| s["scenario"] == "credit-exhaustion").unwrap();
    assert!(ce["vms"][0]["reclaims"].as_u64().unwrap() >= 1, "{ce}");
    assert_eq!(ce["violations_seen"], 0, "{ce}");
}
