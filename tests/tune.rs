//! `gitplane tune check` on this machine: it runs, names every setting it knows, gives each a
//! status and, for anything not OK, the command to fix it.

mod common;

use std::process::Command;

#[test]
fn tune_check_names_every_setting() {
    let out = Command::new(common::BIN)
        .args(["tune", "check"])
        .output()
        .expect("run gitplane tune check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for s in gitplane::tune::SETTINGS {
        let line = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(s.name))
            .unwrap_or_else(|| panic!("{} missing from:\n{stdout}", s.name));
        assert!(
            ["OK", "LOW", "HIGH", "UNKNOWN"]
                .iter()
                .any(|st| line.split_whitespace().any(|w| w == *st)),
            "no status in `{line}`"
        );
        if !line.contains(" OK ") {
            assert!(
                line.contains("sysctl -w") || line.contains("ulimit"),
                "no fix in `{line}`"
            );
        }
    }
}

#[test]
fn strict_mode_fails_exactly_when_something_is_off() {
    let out = Command::new(common::BIN)
        .args(["tune", "check", "--strict"])
        .output()
        .expect("run gitplane tune check --strict");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let all_ok = stdout.contains("settings OK");
    assert_eq!(out.status.success(), all_ok, "{stdout}");
}
