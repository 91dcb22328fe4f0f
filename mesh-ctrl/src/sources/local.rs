//! Local mode: the config is a directory of the same YAML one would `kubectl apply`, and pod
//! placement is the placement file the cluster-in-a-box harness writes. Both are polled; a file
//! that does not parse is reported and the last good object set keeps serving.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use mesh_api::placement::{PlacementWatch, error_chain};
use tracing::{error, info};

use crate::model::{objects::Objects, store::Store};

/// How often the directory and the placement are looked at.
pub const POLL: Duration = Duration::from_millis(200);

/// Names and modification times of the directory's files: any change means re-read.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| {
            let m = e.metadata().ok();
            (
                e.path(),
                m.as_ref().and_then(|m| m.modified().ok()),
                m.map_or(0, |m| m.len()),
            )
        })
        .collect();
    v.sort();
    v
}

/// Loads `dir` now (an error here fails start-up: there is no last good set yet) and follows it
/// and the placement. Without a directory, only the placement is followed.
pub fn spawn(
    dir: Option<PathBuf>,
    placement: PlacementWatch,
    store: Arc<Store>,
) -> Result<tokio::task::JoinHandle<()>, crate::model::objects::ParseError> {
    store.set_placement((*placement.current()).clone());
    if let Some(dir) = &dir {
        store.set_objects(&Objects::load(dir)?);
    }
    Ok(tokio::spawn(async move {
        let mut seen = dir.as_deref().map(fingerprint);
        let mut pods = placement.current();
        loop {
            tokio::time::sleep(POLL).await;
            let now = placement.current();
            if !Arc::ptr_eq(&now, &pods) {
                pods = now;
                store.set_placement((*pods).clone());
            }
            let Some(dir) = &dir else { continue };
            let fp = Some(fingerprint(dir));
            if fp == seen {
                continue;
            }
            seen = fp;
            match Objects::load(dir) {
                Ok(objects) => {
                    let invalid = store.set_objects(&objects);
                    info!(dir = %dir.display(), objects = objects.refs().len(), invalid = invalid.len(), "config directory reloaded");
                }
                Err(e) => {
                    error!(dir = %dir.display(), error = %error_chain(&e), "config directory rejected; the last good objects keep serving")
                }
            }
        }
    }))
}

/// Rollback in local mode: the directory is the source of truth, so the earlier object set is
/// written back into it. The files it replaces are kept in `.replaced-<unix seconds>/`.
pub fn rollback(dir: &Path, version: u64, objects: &Objects) -> std::io::Result<PathBuf> {
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let aside = dir.join(format!(".replaced-{stamp}"));
    std::fs::create_dir_all(&aside)?;
    for (path, _, _) in fingerprint(dir) {
        if path.is_file() {
            std::fs::rename(&path, aside.join(path.file_name().unwrap_or_default()))?;
        }
    }
    let target = dir.join(format!("rollback-to-v{version}.yaml"));
    let tmp = aside.join("rollback.tmp");
    std::fs::write(&tmp, objects.to_yaml())?;
    std::fs::rename(&tmp, &target)?;
    info!(version, file = %target.display(), replaced = %aside.display(), "rolled back");
    Ok(target)
}
