//! The folder of a training run (`--out`): what a run writes there, whether it already holds another
//! run, and `metrics.jsonl` brought back to a checkpoint's step on resume.
//!
//! A run writes exactly these: `checkpoints/step-NNNNNN/` folders, `metrics.jsonl` and
//! `samples/step-NNNNNN.png`. A fresh run (no `--resume`) into a folder holding any of them refuses,
//! unless `--overwrite` is given; then it deletes those and nothing else.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::checkpoint;

/// The metrics file of a run folder.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// The paths of one run folder.
#[derive(Debug, Clone)]
pub struct RunDir {
    /// The folder itself (`--out`).
    pub root: PathBuf,
}

impl RunDir {
    /// The run folder at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        RunDir { root: root.into() }
    }

    /// `checkpoints/`, where each checkpoint is a `step-NNNNNN` folder.
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    /// `samples/`, where the sample grids go.
    pub fn samples(&self) -> PathBuf {
        self.root.join("samples")
    }

    /// `metrics.jsonl`, one JSON line per optimizer step.
    pub fn metrics(&self) -> PathBuf {
        self.root.join(METRICS_FILE)
    }

    /// The sample grids a run wrote: `samples/step-NNNNNN.png`.
    fn sample_grids(&self) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(self.samples()) else { return Vec::new() };
        entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                name.strip_prefix("step-").and_then(|s| s.strip_suffix(".png")).is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            })
            .collect()
    }

    /// What of an earlier run the folder holds, in words (`None` when nothing): its checkpoints, its
    /// metrics and its sample grids.
    pub fn earlier_run(&self) -> Option<String> {
        let mut what = Vec::new();
        let ckpts = checkpoint::list(&self.checkpoints());
        if let Some((last, _)) = ckpts.last() {
            what.push(format!("{} checkpoint(s) up to step {last}", ckpts.len()));
        }
        if std::fs::metadata(self.metrics()).is_ok_and(|m| m.len() > 0) {
            what.push(METRICS_FILE.to_string());
        }
        let grids = self.sample_grids().len();
        if grids > 0 {
            what.push(format!("{grids} sample grid(s)"));
        }
        (!what.is_empty()).then(|| what.join(", "))
    }

    /// Refuses to start a fresh run in a folder that holds another run's files, unless `overwrite`;
    /// with it, deletes those files (checkpoints, metrics, sample grids) and nothing else.
    pub fn prepare_fresh(&self, overwrite: bool) -> Result<()> {
        let Some(what) = self.earlier_run() else { return Ok(()) };
        if !overwrite {
            bail!(
                "{}: holds another run ({what}); continue it with --resume auto, choose another --out, or give --overwrite to delete that run's files",
                self.root.display()
            );
        }
        for (_, dir) in checkpoint::list(&self.checkpoints()) {
            std::fs::remove_dir_all(&dir).with_context(|| format!("{}: cannot delete", dir.display()))?;
        }
        for p in self.sample_grids().into_iter().chain([self.metrics()].into_iter().filter(|p| p.exists())) {
            std::fs::remove_file(&p).with_context(|| format!("{}: cannot delete", p.display()))?;
        }
        eprintln!("--overwrite: deleted the earlier run in {} ({what})", self.root.display());
        Ok(())
    }

    /// Cuts `metrics.jsonl` back to the lines of steps 1 to `step`, the steps a resumed checkpoint
    /// holds: a run killed after its last checkpoint logged steps that the resumed run logs again. A
    /// torn or unreadable line (the kill can cut the last one) ends the kept part. Rewritten through a
    /// temporary file and renamed.
    pub fn truncate_metrics(&self, step: u64) -> Result<()> {
        let path = self.metrics();
        let Ok(text) = std::fs::read_to_string(&path) else { return Ok(()) };
        let mut kept = String::new();
        for line in text.lines() {
            let s = serde_json::from_str::<serde_json::Value>(line).ok().and_then(|v| v.get("step")?.as_u64());
            match s {
                Some(s) if s <= step => {
                    kept.push_str(line);
                    kept.push('\n');
                }
                _ => break,
            }
        }
        if kept.len() == text.len() {
            return Ok(());
        }
        let tmp = self.root.join(format!(".{METRICS_FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(kept.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().with_context(|| format!("{}: cannot cut back to step {step}", path.display()))
    }

    /// Opens `metrics.jsonl` for appending (a resumed run, after [`RunDir::truncate_metrics`]) or
    /// truncated (a fresh run).
    pub fn open_metrics(&self, append: bool) -> Result<std::fs::File> {
        let path = self.metrics();
        std::fs::OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(&path)
            .with_context(|| format!("{}: cannot open", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_cut_back_to_the_checkpoint_and_a_torn_line_is_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::new(tmp.path());
        let lines: String = (1..=9).map(|s| format!("{{\"step\":{s},\"loss\":0.5}}\n")).collect();
        std::fs::write(run.metrics(), format!("{lines}{{\"step\":10,\"lo")).unwrap();
        run.truncate_metrics(5).unwrap();
        let text = std::fs::read_to_string(run.metrics()).unwrap();
        assert_eq!(text, (1..=5).map(|s| format!("{{\"step\":{s},\"loss\":0.5}}\n")).collect::<String>());
        // a torn line before the checkpoint's step ends the kept part too
        std::fs::write(run.metrics(), "{\"step\":1}\n{\"st\n").unwrap();
        run.truncate_metrics(5).unwrap();
        assert_eq!(std::fs::read_to_string(run.metrics()).unwrap(), "{\"step\":1}\n");
    }

    #[test]
    fn a_used_folder_is_refused_and_overwrite_deletes_only_the_runs_files() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::new(tmp.path());
        run.prepare_fresh(false).unwrap();
        // a checkpoint is a step folder holding the training state
        std::fs::create_dir_all(run.checkpoints().join("step-000004")).unwrap();
        std::fs::write(run.checkpoints().join("step-000004").join(checkpoint::STATE_FILE), b"state").unwrap();
        std::fs::create_dir_all(run.samples()).unwrap();
        std::fs::write(run.samples().join("step-000004.png"), b"png").unwrap();
        std::fs::write(run.samples().join("mine.png"), b"png").unwrap();
        std::fs::write(run.root.join("notes.txt"), b"keep").unwrap();
        let e = run.prepare_fresh(false).unwrap_err().to_string();
        assert!(e.contains("1 checkpoint(s) up to step 4, 1 sample grid(s)") && e.contains("--overwrite") && !e.contains('\n'), "{e}");
        run.prepare_fresh(true).unwrap();
        assert!(run.earlier_run().is_none() && !run.checkpoints().join("step-000004").exists());
        assert!(run.samples().join("mine.png").exists() && run.root.join("notes.txt").exists());
    }
}
