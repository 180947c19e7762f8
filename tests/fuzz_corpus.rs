//! Replays the fuzz corpora on stable Rust: every file in
//! fuzz/corpus/<target>/ and fuzz/regressions/<target>/ goes through the same
//! invariant checks the cargo-fuzz target runs (fuzz/checks.rs).
//!
//! A target's corpus directory must exist and hold at least one input, so a
//! lost corpus fails here instead of passing with nothing checked.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The inputs in `dir`, sorted; hidden files (libFuzzer's temporaries) are
/// skipped. `None` if the directory does not exist.
fn inputs(dir: &Path) -> Option<Vec<PathBuf>> {
    let entries = fs::read_dir(dir).ok()?;
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap_or_else(|err| panic!("{}: {err}", dir.display())).path())
        .filter(|p| p.is_file() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .collect();
    files.sort();
    Some(files)
}

fn subdirs(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

fn replay(target: &str) {
    let check = checks::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, check)| *check)
        .unwrap_or_else(|| panic!("no check for target {target}"));
    let corpus_dir = fuzz_dir().join("corpus").join(target);
    let corpus = inputs(&corpus_dir).unwrap_or_else(|| panic!("corpus {} is missing", corpus_dir.display()));
    assert!(!corpus.is_empty(), "corpus {} is empty", corpus_dir.display());
    let regressions = inputs(&fuzz_dir().join("regressions").join(target)).unwrap_or_default();

    let mut failed = Vec::new();
    for file in corpus.iter().chain(&regressions) {
        let data = fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        if panic::catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            eprintln!("{target}: {} failed its checks (see the panic above)", file.display());
            failed.push(file.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: {} of {} inputs failed: {failed:#?}",
        failed.len(),
        corpus.len() + regressions.len()
    );
}

#[test]
fn parse_query() {
    replay("parse_query");
}

#[test]
fn parse_response() {
    replay("parse_response");
}

#[test]
fn walk() {
    replay("walk");
}

#[test]
fn framer() {
    replay("framer");
}

#[test]
fn id_table() {
    replay("id_table");
}

/// Every corpus and regression directory belongs to a target replayed
/// above, and every target has its cargo-fuzz wrapper.
#[test]
fn every_target_is_replayed() {
    let known: Vec<&str> = checks::TARGETS.iter().map(|(name, _)| *name).collect();
    for base in ["corpus", "regressions"] {
        for dir in subdirs(&fuzz_dir().join(base)) {
            assert!(known.contains(&dir.as_str()), "fuzz/{base}/{dir} has no replay here");
        }
    }
    for name in known {
        let wrapper = fuzz_dir().join("fuzz_targets").join(format!("{name}.rs"));
        assert!(wrapper.is_file(), "{} is missing", wrapper.display());
    }
}
