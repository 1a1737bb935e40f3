//! The tree index generator: runs `tree_index.py` with this worker's portage
//! (through the checked runner, argv only) over the target's repository and
//! profile, with the target's make.conf and no user configuration, and
//! stores the result as `<target>/tree-index/<target hash>.json`
//! (pacloud_domain::tree). Workers make sure every target that asks for a
//! tree index and whose repository they have gets one at start.

use pacloud_domain::ports::{ArtifactError, ArtifactStore};
use pacloud_domain::target::{Target, TargetSet};
use pacloud_domain::tree::{TREE_INDEX_FORMAT, TreeIndex, TreeIndexDoc, TreeIndexError};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::plan::BuildEnv;
use crate::runner::{CommandError, run_checked};
use crate::sandbox::PortageInstall;

/// The generator, run as `python -c SCRIPT CONFIG_ROOT ROOT`.
pub const SCRIPT: &str = include_str!("tree_index.py");

/// Why an index could not be made or stored.
#[derive(Debug, thiserror::Error)]
pub enum TreeIndexGenError {
    #[error("target {target} uses repository {repo:?}, which this worker does not have")]
    UnknownRepository { target: String, repo: String },
    #[error("cannot prepare {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("portage could not compute the tree index")]
    Portage(#[from] CommandError),
    #[error("the generator's output is not a tree index")]
    Output(#[source] serde_json::Error),
    #[error(transparent)]
    Invalid(#[from] TreeIndexError),
    #[error("cannot store the tree index")]
    Store(#[from] ArtifactError),
}

/// What [`ensure`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ensured {
    /// The index was stored already.
    Present,
    /// This call computed and stored it (its size in bytes).
    Stored { bytes: usize, ebuilds: u64 },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TreeIndexGenError + '_ {
    move |source| TreeIndexGenError::Io { path: path.to_owned(), source }
}

/// The make.conf the generator sees: what a build's make.conf says about
/// the configuration (CHOST, flags, the target's extra variables, e.g.
/// USE), nothing about directories.
fn make_conf(target: &Target) -> String {
    let q = crate::plan::quote;
    let mut lines = vec![
        format!("CHOST={}", q(&target.spec.chost)),
        format!("CFLAGS={}", q(&target.spec.cflags)),
        format!("CXXFLAGS={}", q(&target.spec.cxxflags)),
        format!("LDFLAGS={}", q(&target.spec.ldflags)),
        "ACCEPT_LICENSE=\"*\"".to_owned(),
    ];
    for (k, v) in &target.spec.env {
        lines.push(format!("{k}={}", q(v)));
    }
    lines.join("\n") + "\n"
}

/// Computes the index of `target` from `repo` with `portage`, in a scratch
/// directory under `work`; returns the stored document's bytes.
pub async fn generate(
    portage: &PortageInstall,
    repo: &Path,
    target: &Target,
    work: &Path,
) -> Result<Vec<u8>, TreeIndexGenError> {
    let config = work.join("config/etc/portage");
    let repos_dir = config.join("repos.conf");
    let root = work.join("root");
    for d in [&repos_dir, &root] {
        std::fs::create_dir_all(d).map_err(io(d))?;
    }
    let name = &target.spec.repository;
    let repos_conf = format!("[DEFAULT]\nmain-repo = {name}\n\n[{name}]\nlocation = {}\n", repo.display());
    let file = repos_dir.join("repos.conf");
    std::fs::write(&file, repos_conf).map_err(io(&file))?;
    let file = config.join("make.conf");
    std::fs::write(&file, make_conf(target)).map_err(io(&file))?;
    let link = config.join("make.profile");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(repo.join("profiles").join(&target.spec.profile), &link).map_err(io(&link))?;
    let python = match portage {
        PortageInstall::Venv(v) => v.join("bin/python").to_string_lossy().into_owned(),
        PortageInstall::System => "python3".to_owned(),
    };
    let argv = vec![
        python,
        "-c".to_owned(),
        SCRIPT.to_owned(),
        work.join("config").to_string_lossy().into_owned(),
        root.to_string_lossy().into_owned(),
    ];
    let out = run_checked(&argv).await?;
    let mut doc: serde_json::Value = serde_json::from_str(&out.stdout).map_err(TreeIndexGenError::Output)?;
    if let Some(m) = doc.as_object_mut() {
        m.insert("target".into(), target.name.as_str().into());
        m.insert("target_hash".into(), target.hash().into());
    }
    let doc: TreeIndexDoc = serde_json::from_value(doc).map_err(TreeIndexGenError::Output)?;
    let index = TreeIndex::new(doc, target)?;
    debug_assert_eq!(index.doc().format, TREE_INDEX_FORMAT);
    serde_json::to_vec(index.doc()).map_err(TreeIndexGenError::Output)
}

/// Stores the index of `target` unless it is stored already.
pub async fn ensure(
    artifacts: &dyn ArtifactStore,
    env: &BuildEnv,
    target: &Target,
) -> Result<Ensured, TreeIndexGenError> {
    let path = TreeIndex::path(target)
        .map_err(|e| TreeIndexGenError::Io { path: e.0.into(), source: std::io::ErrorKind::InvalidInput.into() })?;
    if artifacts.head(&path).await?.is_some() {
        return Ok(Ensured::Present);
    }
    let repo = env.repos.get(&target.spec.repository).ok_or_else(|| TreeIndexGenError::UnknownRepository {
        target: target.name.to_string(),
        repo: target.spec.repository.clone(),
    })?;
    let work = env.work_root.join(format!("tree-index-{}-{}", target.name, std::process::id()));
    let result = generate(&env.portage, repo, target, &work).await;
    let _ = std::fs::remove_dir_all(&work);
    let bytes = result?;
    let ebuilds = serde_json::from_slice::<TreeIndexDoc>(&bytes).map(|d| d.ebuilds).unwrap_or(0);
    artifacts.put_bytes(&path, bytes.clone(), "application/json").await?;
    Ok(Ensured::Stored { bytes: bytes.len(), ebuilds })
}

/// Ensures the index of every target that asks for one and whose
/// repository this worker has; logs the outcome of each.
pub async fn ensure_all(artifacts: Arc<dyn ArtifactStore>, env: BuildEnv, targets: Arc<TargetSet>) {
    for t in targets.iter().filter(|t| t.spec.tree_index && env.repos.contains_key(&t.spec.repository)) {
        let started = std::time::Instant::now();
        match ensure(&*artifacts, &env, t).await {
            Ok(Ensured::Present) => tracing::debug!(target = %t.name, "tree index present"),
            Ok(Ensured::Stored { bytes, ebuilds }) => tracing::info!(
                target = %t.name,
                bytes,
                ebuilds,
                seconds = started.elapsed().as_secs_f64(),
                "tree index stored"
            ),
            Err(e) => {
                tracing::error!(target = %t.name, error = &e as &dyn std::error::Error, "cannot build the tree index")
            }
        }
    }
}
