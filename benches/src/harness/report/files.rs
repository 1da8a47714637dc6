//! Results files: loading them (with the schema version checked) and merging several into one.

use std::io;
use std::path::{Path, PathBuf};

use crate::harness::results::{Machine, Params, Results, SCHEMA_VERSION};
use crate::harness::spec::{Rate, Topology};

/// Why results files cannot be used; each names the file and says what was wrong.
#[derive(thiserror::Error, Debug)]
pub enum LoadError {
    /// no results files given; pass one or more files written by `vswitch-bench run --json`
    #[error("no results files given; pass one or more files written by `vswitch-bench run --json`")]
    NoFiles,
    /// cannot read results file {path}: {source}
    #[error("cannot read results file {}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why it cannot be read.
        source: io::Error,
    },
    /// {path} is not valid JSON ({source}); expected a file written by `vswitch-bench run --json`
    #[error("{} is not valid JSON ({source}); expected a file written by `vswitch-bench run --json`", .path.display())]
    NotJson {
        /// The file.
        path: PathBuf,
        /// Where the JSON breaks.
        source: serde_json::Error,
    },
    /// {path} is not a vswitch-bench results file (it has no "schema" field); expected a file
    /// written by `vswitch-bench run --json`
    #[error(
        "{} is not a vswitch-bench results file (it has no \"schema\" field); expected a file \
         written by `vswitch-bench run --json`",
        .path.display()
    )]
    NoSchema {
        /// The file.
        path: PathBuf,
    },
    /// {path} uses results schema version {version}, but this vswitch-bench reads version
    /// {SCHEMA_VERSION}; use the vswitch-bench that wrote it, or measure again
    #[error(
        "{} uses results schema version {version}, but this vswitch-bench reads version \
         {SCHEMA_VERSION}; use the vswitch-bench that wrote it, or measure again",
        .path.display()
    )]
    OtherVersion {
        /// The file.
        path: PathBuf,
        /// The version it was written with.
        version: u64,
    },
    /// {path} has an invalid "schema" field ({schema}); expected the number {SCHEMA_VERSION}
    #[error(
        "{} has an invalid \"schema\" field ({schema}); expected the number {SCHEMA_VERSION}",
        .path.display()
    )]
    BadSchema {
        /// The file.
        path: PathBuf,
        /// The field as found.
        schema: serde_json::Value,
    },
    /// {path} does not match results schema version {SCHEMA_VERSION}: {source}
    #[error("{} does not match results schema version {SCHEMA_VERSION}: {source}", .path.display())]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// What does not match.
        source: serde_json::Error,
    },
}

/// Reads and parses results files, checking the schema version of each.
///
/// Errors name the file and say what was wrong: unreadable, not JSON, written by an incompatible
/// version, or JSON that is not a results file.
pub fn load(paths: &[PathBuf]) -> Result<Vec<Results>, LoadError> {
    if paths.is_empty() {
        return Err(LoadError::NoFiles);
    }
    paths.iter().map(|p| load_one(p)).collect()
}

/// Reads and parses one results file.
fn load_one(path: &Path) -> Result<Results, LoadError> {
    let path_buf = || path.to_path_buf();
    let text =
        std::fs::read_to_string(path).map_err(|source| LoadError::Read { path: path_buf(), source })?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| LoadError::NotJson { path: path_buf(), source })?;
    let schema = value.get("schema").ok_or_else(|| LoadError::NoSchema { path: path_buf() })?;
    match schema.as_u64() {
        Some(v) if v == u64::from(SCHEMA_VERSION) => {}
        Some(version) => return Err(LoadError::OtherVersion { path: path_buf(), version }),
        None => return Err(LoadError::BadSchema { path: path_buf(), schema: schema.clone() }),
    }
    serde_json::from_value(value).map_err(|source| LoadError::Mismatch { path: path_buf(), source })
}

/// Merges results files: the machine and parameters of the first, the runs of all, in order.
///
/// An empty list gives an empty [`Results`] with a default machine and placeholder parameters
/// ([`load`] never returns an empty list).
pub fn merge(files: Vec<Results>) -> Results {
    let mut it = files.into_iter();
    let Some(mut first) = it.next() else {
        return Results {
            schema: SCHEMA_VERSION,
            machine: Machine::default(),
            params: Params {
                command: String::new(),
                topology: Topology::P2p,
                ports: 0,
                flows: 0,
                duration_s: 0.0,
                warmup_s: 0.0,
                reps: 0,
                rate: Rate::Max,
                backend_cpu: 0,
                generator_cpu: 0,
                backend_cpus: Vec::new(),
                generator_cpus: Vec::new(),
                hugepages: false,
            },
            runs: Vec::new(),
        };
    };
    for f in it {
        first.runs.extend(f.runs);
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::report::stats::summarize;
    use crate::harness::report::testdata::{results, run, sample_runs, temp_dir};
    use crate::harness::spec::{FrameSize, PeerKind};

    #[test]
    fn json_round_trip_and_merge() {
        let d = temp_dir("json");
        let a = results(sample_runs());
        let mut b = results(vec![run(PeerKind::Ovs, FrameSize::Fixed(64), 1, 1.0)]);
        b.machine.cpu_model = "Other".into();
        let (pa, pb) = (d.join("a.json"), d.join("b.json"));
        std::fs::write(&pa, serde_json::to_string_pretty(&a).unwrap()).unwrap();
        std::fs::write(&pb, serde_json::to_string(&b).unwrap()).unwrap();
        let loaded = load(&[pa.clone(), pb]).unwrap();
        assert_eq!(loaded.len(), 2);
        assert_eq!(loaded[0].runs.len(), a.runs.len());
        assert_eq!(loaded[0].runs[2].latency, a.runs[2].latency);
        assert_eq!(loaded[0].runs[7].size, FrameSize::Fixed(1518));
        assert_eq!(serde_json::to_value(&loaded[0]).unwrap(), serde_json::to_value(&a).unwrap());
        let m = merge(loaded);
        assert_eq!(m.machine.cpu_model, "Test CPU @ 3.00GHz");
        assert_eq!(m.runs.len(), a.runs.len() + 1);
        assert_eq!(m.runs.last().map(|r| r.peer), Some(PeerKind::Ovs));
        // Summaries serialise too (for `report --json`).
        let j = serde_json::to_string(&summarize(&m.runs)).unwrap();
        assert!(j.contains("\"ratio_to_first\""));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn load_errors_name_the_file_and_the_problem() {
        let d = temp_dir("errors");
        let missing = d.join("missing.json");
        let e = load(&[missing]).unwrap_err().to_string();
        assert!(e.contains("cannot read results file") && e.contains("missing.json"), "{e}");

        let bad = d.join("bad.json");
        std::fs::write(&bad, "{ not json").unwrap();
        let e = load(&[bad]).unwrap_err().to_string();
        assert!(e.contains("bad.json is not valid JSON"), "{e}");

        let noschema = d.join("noschema.json");
        std::fs::write(&noschema, "{\"runs\": []}").unwrap();
        let e = load(&[noschema]).unwrap_err().to_string();
        assert!(e.contains("noschema.json is not a vswitch-bench results file"), "{e}");

        let mut v = serde_json::to_value(results(sample_runs())).unwrap();
        v["schema"] = serde_json::json!(SCHEMA_VERSION + 1);
        let newer = d.join("newer.json");
        std::fs::write(&newer, v.to_string()).unwrap();
        let e = load(&[newer]).unwrap_err().to_string();
        assert!(
            e.contains("newer.json uses results schema version 2") && e.contains("reads version 1"),
            "{e}"
        );

        let mut v = serde_json::to_value(results(sample_runs())).unwrap();
        v["runs"][0]["size"] = serde_json::json!("huge");
        let wrong = d.join("wrong.json");
        std::fs::write(&wrong, v.to_string()).unwrap();
        let e = load(&[wrong]).unwrap_err().to_string();
        assert!(e.contains("wrong.json does not match results schema version 1"), "{e}");

        assert!(load(&[]).unwrap_err().to_string().contains("no results files"));
        let _ = std::fs::remove_dir_all(&d);
    }
}
