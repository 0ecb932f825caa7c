//! Evidence: how well each working set of an image predicted what the guest
//! really touched in the restores that learned, and the choice of
//! `--estimator auto` that follows from it.
//!
//! After a learning restore thaw knows the saved pages the guest touched
//! first while it watched (the restore and its window). It scores every
//! working set the image had *before* that restore against them, and the
//! union of the learned and the traced set: `hits` (touched and in the
//! set: prefetched for nothing but their read), `missed` (touched, not in
//! the set: a lazy fault each in a `ws` restore) and `unused` (in the set,
//! not touched: read for nothing). The last [`KEPT`] restores are kept in
//! `ws-evidence.json` in the image (written atomically; `thaw inspect`
//! shows it).
//!
//! `auto` takes the candidate with the lowest cost in the latest restore's
//! verdicts: a missed page costs one fault (a round trip plus a read the
//! guest waits on), an unused page an [`UNUSED_PER_MISS`]-th of that (a
//! page more in the sequential prefetch). Without evidence it falls back
//! to the fixed order learned > trace > abit > dirty.

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Estimator, WsError, WsFile};
use crate::image::{Image, PageLocation};
use crate::mem::PageIndex;

/// Restores whose evidence is kept.
pub const KEPT: usize = 8;
/// Unused prefetched pages that cost as much as one missed page.
pub const UNUSED_PER_MISS: u64 = 8;
/// The evidence's file in an image directory.
pub const FILE: &str = "ws-evidence.json";

/// A candidate for `auto`: one working set, or the union of several
/// (prefetched in this order, each page once).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate(pub Vec<Estimator>);

impl Candidate {
    pub fn name(&self) -> String {
        self.0
            .iter()
            .map(|e| e.name())
            .collect::<Vec<_>>()
            .join("+")
    }
}

/// How one candidate did against one restore's first touches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub candidate: Candidate,
    /// Saved pages in it.
    pub pages: u64,
    pub hits: u64,
    pub missed: u64,
    pub unused: u64,
}

impl Verdict {
    /// Its cost in missed-page units (lower is better).
    pub fn cost(&self) -> u64 {
        self.missed * UNUSED_PER_MISS + self.unused
    }
}

/// One learning restore's evidence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RestoreEvidence {
    pub unix_time: u64,
    /// `lazy` or `ws`, and the working set it prefetched, if any.
    pub mode: String,
    pub used: Option<String>,
    /// Saved pages the guest touched first while the restore watched.
    pub touched: u64,
    /// Its lazy faults after the guest ran.
    pub lazy_faults: u64,
    pub verdicts: Vec<Verdict>,
}

/// `ws-evidence.json`: the latest restores' evidence, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub restores: Vec<RestoreEvidence>,
}

fn path_in(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

impl Evidence {
    /// The image's evidence (empty when it has none; an unreadable file is
    /// an error, so a damaged one is noticed).
    pub fn load(image: &Image) -> Result<Evidence, WsError> {
        let path = path_in(image.dir());
        match std::fs::read(&path) {
            Ok(text) => serde_json::from_slice(&text).map_err(|e| WsError::Damaged {
                path,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Evidence::default()),
            Err(source) => Err(WsError::Io {
                path,
                context: "cannot read",
                source,
            }),
        }
    }

    /// Adds one restore's evidence (dropping the oldest beyond [`KEPT`])
    /// and replaces the file atomically.
    pub fn record(image: &Image, restore: RestoreEvidence) -> Result<(), WsError> {
        let mut all = Evidence::load(image).unwrap_or_else(|e| {
            log::warn!("replacing damaged working-set evidence: {e}");
            Evidence::default()
        });
        all.restores.push(restore);
        let excess = all.restores.len().saturating_sub(KEPT);
        all.restores.drain(..excess);
        let path = path_in(image.dir());
        let tmp = image
            .dir()
            .join(format!("{FILE}.tmp-{}", std::process::id()));
        let io = |context| {
            let path = path.clone();
            move |source| WsError::Io {
                path,
                context,
                source,
            }
        };
        let text = serde_json::to_vec_pretty(&all).map_err(|e| WsError::Damaged {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("cannot create"))?;
        f.write_all(&text)
            .and_then(|()| f.sync_all())
            .map_err(io("cannot write"))?;
        std::fs::rename(&tmp, &path).map_err(io("cannot replace"))?;
        Ok(())
    }

    /// The candidate `auto` takes among those the image has now: the
    /// cheapest in the latest restore's verdicts; `None` without evidence
    /// for any of them.
    pub fn best(&self, available: &[Estimator]) -> Option<Candidate> {
        let latest = self.restores.last()?;
        latest
            .verdicts
            .iter()
            .filter(|v| v.candidate.0.iter().all(|e| available.contains(e)))
            .min_by_key(|v| (v.cost(), v.candidate.0.len()))
            .map(|v| v.candidate.clone())
    }
}

/// The candidates scored after a restore: each set the image has, and the
/// union of the learned and the traced set when it has both.
pub fn candidates(available: &[Estimator]) -> Vec<Candidate> {
    let mut all: Vec<Candidate> = available.iter().map(|&e| Candidate(vec![e])).collect();
    if available.contains(&Estimator::Learned) && available.contains(&Estimator::Trace) {
        all.push(Candidate(vec![Estimator::Learned, Estimator::Trace]));
    }
    all
}

/// Scores every candidate of `sets` (the image's working sets before the
/// restore) against the saved pages in `touches`.
pub fn verdicts(image: &Image, sets: &[WsFile], touches: &[PageIndex]) -> Vec<Verdict> {
    let saved = |p: &PageIndex| matches!(image.locate(*p), PageLocation::Slot(_));
    let touched: HashSet<u64> = touches.iter().filter(|p| saved(p)).map(|p| p.0).collect();
    let available: Vec<Estimator> = sets.iter().map(|f| f.set.estimator).collect();
    candidates(&available)
        .into_iter()
        .map(|candidate| {
            let pages: HashSet<u64> = sets
                .iter()
                .filter(|f| candidate.0.contains(&f.set.estimator))
                .flat_map(|f| f.set.pages.iter().map(|p| p.page))
                .filter(saved)
                .map(|p| p.0)
                .collect();
            let hits = pages.intersection(&touched).count() as u64;
            Verdict {
                candidate,
                pages: pages.len() as u64,
                hits,
                missed: touched.len() as u64 - hits,
                unused: pages.len() as u64 - hits,
            }
        })
        .collect()
}

impl std::fmt::Display for Evidence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some(latest) = self.restores.last() else {
            return write!(
                f,
                "  working-set evidence: none yet (auto: learned > trace > abit > dirty)"
            );
        };
        write!(
            f,
            "  working-set evidence ({} learning restores; the latest, {}{}, touched {} saved pages, {} lazy faults):",
            self.restores.len(),
            latest.mode,
            latest.used.as_ref().map(|u| format!(" with {u}")).unwrap_or_default(),
            latest.touched,
            latest.lazy_faults
        )?;
        let mut sorted: Vec<&Verdict> = latest.verdicts.iter().collect();
        sorted.sort_by_key(|v| v.cost());
        for (i, v) in sorted.iter().enumerate() {
            write!(
                f,
                "\n    {:<14} {:>8} pages: {} hits, {} missed, {} unused{}",
                v.candidate.name(),
                v.pages,
                v.hits,
                v.missed,
                v.unused,
                if i == 0 { "  <- auto" } else { "" }
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(names: &[Estimator], hits: u64, missed: u64, unused: u64) -> Verdict {
        Verdict {
            candidate: Candidate(names.to_vec()),
            pages: hits + unused,
            hits,
            missed,
            unused,
        }
    }

    #[test]
    fn auto_takes_the_cheapest_available_candidate_of_the_latest_restore() {
        use Estimator::{Abit, Learned, Trace};
        let old = RestoreEvidence {
            unix_time: 1,
            mode: "lazy".into(),
            used: None,
            touched: 100,
            lazy_faults: 100,
            verdicts: vec![verdict(&[Trace], 100, 0, 0)],
        };
        let latest = RestoreEvidence {
            unix_time: 2,
            verdicts: vec![
                // Missed 5000 pages: what the learned set of the issue did.
                verdict(&[Learned], 9000, 5000, 800),
                verdict(&[Trace], 13000, 1000, 2300),
                verdict(&[Learned, Trace], 13900, 100, 3000),
                verdict(&[Abit], 14000, 0, 90_000),
            ],
            ..old.clone()
        };
        let e = Evidence {
            restores: vec![old, latest],
        };
        assert_eq!(
            e.best(&[Learned, Trace, Abit]),
            Some(Candidate(vec![Learned, Trace]))
        );
        // The union needs both sets; abit's unused pages cost more than
        // trace's misses.
        assert_eq!(e.best(&[Trace, Abit]), Some(Candidate(vec![Trace])));
        assert_eq!(e.best(&[Estimator::Dirty]), None);
        assert_eq!(Evidence::default().best(&[Learned]), None);
    }

    #[test]
    fn the_union_is_a_candidate_only_with_both_sets() {
        use Estimator::{Abit, Learned, Trace};
        assert_eq!(candidates(&[Learned, Abit]).len(), 2);
        let all = candidates(&[Learned, Trace]);
        assert_eq!(
            all.last().map(Candidate::name).as_deref(),
            Some("learned+trace")
        );
    }
}
