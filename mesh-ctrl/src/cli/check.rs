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
    let objects = if path == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|source| ParseError::Read {
                path: "-".into(),
                source,
            })?;
        let mut o = Objects::default();
        o.add_yaml("<stdin>", &text)?;
        o
    } else {
        Objects::load(Path::new(path))?
    };
    Ok(Report {
        objects: objects.refs().len(),
        invalid: validate(&objects),
    })
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
