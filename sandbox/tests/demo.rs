//! `usher-sandbox` from outside: the demo from any folder, and the help of its commands.

use std::path::PathBuf;
use std::process::Output;

const SANDBOX: &str = env!("CARGO_BIN_EXE_usher-sandbox");

/// The product binary, built beside this one (`cargo build`/`cargo test` at the root build
/// both).
fn usher() -> PathBuf {
    let p = PathBuf::from(SANDBOX).with_file_name("usher");
    assert!(
        p.is_file(),
        "{} is not built: run the tests from the workspace root (`cargo test`)",
        p.display()
    );
    p
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn the_demo_runs_from_any_folder_and_writes_nothing_there() {
    let cwd = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(SANDBOX)
        .args(["demo", "--contacts", "20"])
        .current_dir(cwd.path())
        .env("TMPDIR", tmp.path())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", stderr(&out));
    assert!(
        text.contains(&format!(
            "usher demo: configuration {}/usher-demo-",
            tmp.path().display()
        )),
        "{text}"
    );
    assert_eq!(
        std::fs::read_dir(cwd.path()).unwrap().count(),
        0,
        "nothing written in the working folder"
    );
    // The status command it suggests shows what the demo recorded.
    let hint = text
        .lines()
        .find_map(|l| l.split("try `").nth(1))
        .and_then(|l| l.strip_suffix("`"))
        .unwrap_or_else(|| panic!("a status command in:\n{text}"));
    let args: Vec<&str> = hint.split_whitespace().skip(1).collect();
    let status = std::process::Command::new(usher())
        .args(&args)
        .current_dir(cwd.path())
        .output()
        .unwrap();
    assert_eq!(status.status.code(), Some(0), "{}", stderr(&status));
    assert!(stdout(&status).contains("contacts"), "{}", stdout(&status));
}

#[test]
fn the_demo_lists_what_it_uses_and_the_product_has_no_demo() {
    let help = |args: &[&str]| {
        let out = std::process::Command::new(SANDBOX)
            .args(args)
            .arg("--help")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        stdout(&out)
    };
    for command in ["serve", "bench-scale", "bench-s360"] {
        help(&[command]);
    }
    let demo = help(&["demo"]);
    assert!(
        demo.contains("--demo-config") && demo.contains("--state-dir"),
        "{demo}"
    );
    assert!(!demo.contains("--config "), "{demo}");
    // The product has none of these.
    let out = std::process::Command::new(usher())
        .args(["demo", "--help"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "usher demo: {}", stdout(&out));
}
