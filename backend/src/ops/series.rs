//! `thaw checkpoint NAME DIR --interval-ms N`: continuous checkpoints of a
//! running VM, one after another into the series directory DIR, each an
//! incremental image of the one before (live unless asked otherwise).
//!
//! Images are `DIR/ckpt-<n>` (n counts from 1 over the whole series).
//! Every `keep`-th image is a full one that starts a new chain, and the
//! others build on their predecessor, so the last `keep` checkpoints are
//! always restorable while at most `2 × keep` images exist: once the newest
//! chain holds `keep` images, every image of the chains before it is
//! removed. `DIR/series.json` lists the images that exist, oldest first,
//! rewritten atomically after each checkpoint. The VM's owner lock is held
//! for the whole series; it ends after `count` checkpoints, when asked to
//! stop (between two checkpoints), or when a checkpoint fails (the VM
//! then runs on, and the images taken so far stay).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::ops::save::{self, SaveError, SaveMethod, SaveOptions, SpeculateOptions};

/// Errors of a series.
#[derive(Debug, thiserror::Error)]
pub enum SeriesError {
    #[error(transparent)]
    Save(#[from] SaveError),
    #[error("--keep must be at least 1")]
    Keep,
    #[error("{context} {path}: {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Options of a series.
#[derive(Clone, Debug)]
pub struct SeriesOptions {
    /// From the start of one checkpoint to the start of the next (the next
    /// starts at once if one took longer).
    pub interval: Duration,
    /// Checkpoints kept restorable (and the length of a chain).
    pub keep: u32,
    /// Stop after this many checkpoints.
    pub count: Option<u64>,
    pub method: SaveMethod,
    pub copy_limit: Option<u64>,
    /// Live: speculative pre-copy ([`SaveOptions::speculate`]).
    pub speculate: SpeculateOptions,
    /// The VM is a libvirt domain at this URI.
    pub libvirt: Option<String>,
}

/// One checkpoint of a series, as `series.json` lists it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SeriesEntry {
    pub n: u64,
    pub image: PathBuf,
    /// The image it builds on (`None`: a full image).
    pub parent: Option<PathBuf>,
    /// The checkpoint's instant (the pause), ms since the Unix epoch.
    pub paused_at_unix_ms: f64,
    pub paused_ms: f64,
    /// Pages it wrote, and pages it took from its parent.
    pub pages_written: u64,
    pub inherited_pages: u64,
    pub total_ms: f64,
    /// Live: write faults the guest took, and pages copied ahead
    /// (predicted from the previous checkpoint's writes).
    #[serde(default)]
    pub wp_faults: u64,
    #[serde(default)]
    pub speculated_pages: u64,
    /// The pause's two parts, side by side: QEMU writing the device
    /// state, and (live) thaw protecting or copying guest RAM.
    #[serde(default)]
    pub device_state_ms: f64,
    #[serde(default)]
    pub protect_ms: f64,
}

/// What a series did.
#[derive(Clone, Debug, Serialize)]
pub struct SeriesReport {
    pub name: String,
    pub dir: PathBuf,
    /// Every checkpoint taken, including those removed since.
    pub taken: Vec<SeriesEntry>,
    /// The images that exist at the end, oldest first.
    pub kept: Vec<PathBuf>,
    /// Why it ended: `count`, `signal`, or the error of a failed checkpoint.
    pub ended_by: String,
}

impl std::fmt::Display for SeriesReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} checkpoints of {} into {} (ended by {}); {} kept",
            self.taken.len(),
            self.name,
            self.dir.display(),
            self.ended_by,
            self.kept.len()
        )?;
        for e in &self.taken {
            writeln!(
                f,
                "  {}: paused {:.1} ms, {} pages written{}",
                e.image.display(),
                e.paused_ms,
                e.pages_written,
                match &e.parent {
                    Some(_) => format!(", {} inherited", e.inherited_pages),
                    None => " (full)".into(),
                }
            )?;
        }
        Ok(())
    }
}

/// The image path of checkpoint `n` of the series in `dir`.
pub fn image_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("ckpt-{n:06}"))
}

/// Takes checkpoints of VM `name` into `dir` until `count`, `stop` or a
/// failure; see the module documentation.
pub async fn run(
    name: &str,
    dir: &Path,
    opts: &SeriesOptions,
    stop: impl Future<Output = ()>,
) -> Result<SeriesReport, SeriesError> {
    if opts.keep == 0 {
        return Err(SeriesError::Keep);
    }
    let owner = save::own(name, opts.libvirt.as_deref(), "checkpoint series").await?;
    std::fs::create_dir_all(dir).map_err(|source| SeriesError::Io {
        context: "creating",
        path: dir.to_owned(),
        source,
    })?;
    tokio::pin!(stop);
    let keep = u64::from(opts.keep);
    let (mut taken, mut kept): (Vec<SeriesEntry>, Vec<SeriesEntry>) = (Vec::new(), Vec::new());
    let mut n = 0u64;
    // Speculative pre-copy: the next checkpoint's writes are predicted by
    // those the previous one saw.
    let mut predicted = None;
    let ended_by = loop {
        if opts.count.is_some_and(|c| n >= c) {
            break "count".to_string();
        }
        let started = Instant::now();
        n += 1;
        // Every keep-th image starts a new chain.
        let parent = ((n - 1) % keep != 0).then(|| image_path(dir, n - 1));
        let image = image_path(dir, n);
        let saved = save::save_owned(
            name,
            &image,
            &SaveOptions {
                force: true,
                keep_running: true,
                method: opts.method,
                copy_limit: opts.copy_limit,
                parent: parent.clone(),
                speculate: opts.speculate,
                predicted: predicted.take(),
                ..Default::default()
            },
            &owner,
        )
        .await;
        let mut report = match saved {
            Ok(r) => r,
            Err(e) => {
                log::error!("checkpoint {n} of the series failed: {e}");
                break e.to_string();
            }
        };
        let entry = SeriesEntry {
            n,
            image,
            parent,
            paused_at_unix_ms: report.paused_at_unix_ms,
            paused_ms: report.paused_ms,
            pages_written: report.nonzero_pages,
            inherited_pages: report.inherited_pages,
            total_ms: report.total_ms,
            wp_faults: report.live.as_ref().map_or(0, |l| l.wp_faults),
            speculated_pages: report.live.as_ref().map_or(0, |l| l.speculated_pages),
            device_state_ms: report.device_state_ms,
            protect_ms: report.live.as_ref().map_or(0.0, |l| l.protect_ms),
        };
        if report.live.is_some() {
            predicted = Some((
                std::mem::take(&mut report.written_pages),
                "previous-checkpoint",
            ));
        }
        log::info!(
            "checkpoint {n}: paused {:.1} ms, {} pages written, {} write faults, {} pages copied ahead",
            entry.paused_ms,
            entry.pages_written,
            entry.wp_faults,
            entry.speculated_pages
        );
        taken.push(entry.clone());
        kept.push(entry);
        prune(dir, &mut kept, keep)?;
        write_index(dir, &kept)?;
        let wait = opts.interval.saturating_sub(started.elapsed());
        tokio::select! {
            () = &mut stop => break "signal".to_string(),
            () = tokio::time::sleep(wait) => {}
        }
    };
    Ok(SeriesReport {
        name: name.to_string(),
        dir: dir.to_owned(),
        kept: kept.iter().map(|e| e.image.clone()).collect(),
        taken,
        ended_by,
    })
}

/// Removes the chains before the newest once it holds `keep` images.
fn prune(dir: &Path, kept: &mut Vec<SeriesEntry>, keep: u64) -> Result<(), SeriesError> {
    let Some(newest) = kept.last().map(|e| e.n) else {
        return Ok(());
    };
    // The first image of the newest chain.
    let chain_start = newest - (newest - 1) % keep;
    if newest - chain_start + 1 < keep {
        // The newest chain is not yet long enough to stand alone; the
        // last `keep` checkpoints reach into the chain before it.
        let oldest_needed = (newest + 1).saturating_sub(keep);
        let base = oldest_needed - (oldest_needed.saturating_sub(1)) % keep;
        remove_before(dir, kept, base)
    } else {
        remove_before(dir, kept, chain_start)
    }
}

fn remove_before(dir: &Path, kept: &mut Vec<SeriesEntry>, first: u64) -> Result<(), SeriesError> {
    let _ = dir;
    while kept.first().is_some_and(|e| e.n < first) {
        let e = kept.remove(0);
        std::fs::remove_dir_all(&e.image).map_err(|source| SeriesError::Io {
            context: "removing",
            path: e.image.clone(),
            source,
        })?;
        log::info!("removed {} (no longer needed)", e.image.display());
    }
    Ok(())
}

/// Rewrites `series.json` atomically.
fn write_index(dir: &Path, kept: &[SeriesEntry]) -> Result<(), SeriesError> {
    let path = dir.join("series.json");
    let tmp = dir.join("series.json.tmp");
    let io = |context, source| SeriesError::Io {
        context,
        path: path.clone(),
        source,
    };
    let text = serde_json::to_vec_pretty(kept).map_err(|e| io("encoding", e.into()))?;
    std::fs::write(&tmp, text).map_err(|e| io("writing", e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io("replacing", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path, ns: std::ops::RangeInclusive<u64>) -> Vec<SeriesEntry> {
        ns.map(|n| SeriesEntry {
            n,
            image: image_path(dir, n),
            parent: None,
            paused_at_unix_ms: 0.0,
            paused_ms: 0.0,
            pages_written: 0,
            inherited_pages: 0,
            total_ms: 0.0,
            wp_faults: 0,
            speculated_pages: 0,
            device_state_ms: 0.0,
            protect_ms: 0.0,
        })
        .collect()
    }

    /// Which images remain after checkpoint `newest` with `keep`.
    fn kept_after(newest: u64, keep: u64) -> Vec<u64> {
        let tmp = tempfile::tempdir().expect("tmp");
        let mut kept = entries(tmp.path(), 1..=newest);
        for e in &kept {
            std::fs::create_dir_all(&e.image).expect("mkdir");
        }
        prune(tmp.path(), &mut kept, keep).expect("prune");
        for e in &kept {
            assert!(e.image.exists());
        }
        kept.iter().map(|e| e.n).collect()
    }

    #[test]
    fn the_last_keep_checkpoints_stay_restorable_in_at_most_two_chains() {
        // keep 3: chains 1-2-3, 4-5-6, 7-8-9 ...
        assert_eq!(kept_after(1, 3), vec![1]);
        assert_eq!(kept_after(3, 3), vec![1, 2, 3]);
        // 4 starts a chain; 2 and 3 are still among the last 3 and need 1.
        assert_eq!(kept_after(4, 3), vec![1, 2, 3, 4]);
        assert_eq!(kept_after(5, 3), vec![1, 2, 3, 4, 5]);
        // The chain 4-5-6 holds the last 3: the one before goes.
        assert_eq!(kept_after(6, 3), vec![4, 5, 6]);
        assert_eq!(kept_after(7, 3), vec![4, 5, 6, 7]);
        assert_eq!(kept_after(1, 1), vec![1]);
        assert_eq!(kept_after(5, 1), vec![5]);
        for newest in 1..30 {
            for keep in 1..6 {
                let kept = kept_after(newest, keep);
                let last = (newest + 1).saturating_sub(keep).max(1);
                assert!(
                    kept.first().is_some_and(|&f| f <= last),
                    "{newest} {keep}: {kept:?}"
                );
                assert!(kept.len() as u64 <= 2 * keep, "{newest} {keep}: {kept:?}");
            }
        }
    }
}
