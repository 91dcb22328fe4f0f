//! `mesh-ctrl check PATH|-`: the controller's validation, offline, for CI pipelines.
use std::{io::Read, path::Path};

use serde_json::json;

use crate::model::{
    objects::{Objects, ParseError},
    validate::{Invalid, validate},
};

/// What `check` found.
pub struct Report {
    pub objects: usize,
    pub invalid: Vec<Invalid>,
}

/// Reads `path` (a file, a directory of YAML files, or `-` for standard input) and validates it.
pub fn check(path: &str) -> Result<Report, ParseError> {
    if path == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|source| ParseError::Read {
                path: "-".into(),
                source,
            })?;
        return check_text("<stdin>", &text);
    }
    Ok(report(&Objects::load(Path::new(path))?))
}

/// Validates YAML documents given as text (`origin` names them in errors). Also the fuzz
/// target's entry (`mesh-ctrl/fuzz`): any text gets a report or an error, never a panic.
pub fn check_text(origin: &str, text: &str) -> Result<Report, ParseError> {
    let mut o = Objects::default();
    o.add_yaml(origin, text)?;
    Ok(report(&o))
}

fn report(objects: &Objects) -> Report {
    Report {
        objects: objects.refs().len(),
        invalid: validate(objects),
    }
}

impl Report {
    pub fn human(&self) -> String {
        let mut out = String::new();
        for i in &self.invalid {
            out.push_str(&format!("invalid: {i}\n"));
        }
        out.push_str(&format!(
            "{} objects, {} problems\n",
            self.objects,
            self.invalid.len()
        ));
        out
    }

    pub fn json(&self) -> serde_json::Value {
        json!({
            "objects": self.objects,
            "invalid": self.invalid.iter().map(|i| json!({
                "kind": i.object.kind,
                "namespace": i.object.namespace,
                "name": i.object.name,
                "field": i.field,
                "reason": i.reason,
            })).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    /// Every committed input of the fuzz target (`mesh-ctrl/fuzz/corpus/check`) replays clean:
    /// the fuzzer's findings stay regression tests without libFuzzer.
    #[test]
    fn the_committed_corpus_replays_clean() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/check");
        let mut replayed = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
            let run = std::panic::catch_unwind(|| super::check_text("corpus", &text));
            assert!(run.is_ok(), "{} fails", path.display());
            replayed += 1;
        }
        assert!(replayed > 0);
    }
}
