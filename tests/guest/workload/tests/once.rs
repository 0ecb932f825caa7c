//! Runs the built binary in `--once` host mode and checks the line formats
//! that the test harness parses.

use std::process::Command;

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

#[test]
fn once_mode_output() {
    let out = Command::new(env!("CARGO_BIN_EXE_thaw-workload"))
        .args([
            "--no-cmdline",
            "--once",
            "--mem",
            "6M",
            "--hot=2M",
            "--seed",
            "5",
        ])
        .output()
        .expect("run thaw-workload");
    assert!(out.status.success(), "exit status {:?}", out.status);
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");

    let ready = lines[0];
    assert!(ready.starts_with("THAW-READY "), "{ready}");
    let nonce = field(ready, "nonce");
    assert_eq!(nonce.len(), 16);
    assert!(nonce
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    assert_eq!(field(ready, "mem"), (6u64 << 20).to_string());
    assert_eq!(field(ready, "hot"), (2u64 << 20).to_string());
    assert_eq!(field(ready, "blocks"), "6");
    assert_eq!(field(ready, "seed"), "5");

    let mut last_uptime = 0u64;
    for (i, line) in lines[1..].iter().enumerate() {
        let t = i + 1;
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words.len(), 8, "{line}");
        assert_eq!(words[0], "THAW-TICK");
        assert_eq!(words[1], t.to_string());
        assert_eq!(field(line, "nonce"), nonce);
        assert_eq!(field(line, "ok"), "1");
        assert_eq!(field(line, "full"), if t == 3 { "1" } else { "0" });
        assert_eq!(field(line, "bad"), "0");
        let up: u64 = field(line, "uptime_ms").parse().unwrap();
        assert!(up >= last_uptime);
        last_uptime = up;
        let work: u64 = field(line, "work_us").parse().unwrap();
        assert!(
            work <= up * 1000 + 1000,
            "a tick's work cannot outlast the run: {line}"
        );
    }
}

#[test]
fn nonce_differs_between_runs() {
    let run = || {
        let out = Command::new(env!("CARGO_BIN_EXE_thaw-workload"))
            .args(["--no-cmdline", "--once", "--mem", "1M"])
            .output()
            .unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        field(text.lines().next().unwrap(), "nonce").to_string()
    };
    assert_ne!(run(), run());
}

#[test]
fn bad_parameter_is_reported() {
    let out = Command::new(env!("CARGO_BIN_EXE_thaw-workload"))
        .args(["--no-cmdline", "--once", "--mem", "12Q"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("THAW-ERROR "), "{text}");
}
