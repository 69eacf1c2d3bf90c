//! The merge job for Hugging Face ViTs (`model.arch = "vit"`): originals (trained if missing),
//! baselines, FS-Merge (local / global / local-then-global) in this process or on the workers of
//! the plan (`cluster`), fold, evaluate, and write the merged model as one standard
//! `ViTForImageClassification` whose classifier stacks every task's head.

use crate::cluster::Launch;
use crate::job::checks::{check_classifier, check_rank};
use crate::job::originals;
use crate::job::prepare::{prepare, restore_local_phase, take_heads};
use crate::job::rows::{
    fs_merge_variant, kd_settings, local_gap, report_local_phase, stacked_labels, variant,
    warn_if_global_rose, Evaluator,
};
use crate::job::Job;
use crate::report::progress::Reporter;
use crate::{cluster, report};
use anyhow::{bail, Context, Result};
use fsmerge_common::checkpoint::{write_json, HostTensor};
use fsmerge_common::config::{Baseline, Mode};
use fsmerge_common::fsio::Staging;
use fsmerge_common::hf::VitConfig;
use fsmerge_common::metrics::MethodResult;
use fsmerge_common::plan::Plan;
use fsmerge_common::Error;
use fsmerge_worker::core::eval::EvalSet;
use fsmerge_worker::core::linear::Linear;
use fsmerge_worker::core::mu::with_mu_seed;
use fsmerge_worker::core::tensor::chunked;
use fsmerge_worker::data::merge_set::MergeSet;
use fsmerge_worker::families::vit::merge::{original_logits, MergedVit, VitLoss, VitTeacher};
use fsmerge_worker::families::vit::model::{Vit, VitPart};
use fsmerge_worker::families::vit::supernet::VitSuperNet;
use fsmerge_worker::families::vit::{baselines as vit_baselines, merge as vit_merge};
use fsmerge_worker::family::family;
use fsmerge_worker::train::progress::LogRow;
use fsmerge_worker::train::settings::TrainSettings;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Instant;

/// Load every task's original ViT and check it can be merged: a classifier with one output per
/// class of its task, single-channel input of the data's image size.
fn load_models(job: &Job) -> Result<Vec<Vit>> {
    let side = job.cfg.data.dataset.image_side();
    let mut models = Vec::new();
    for task in &job.cfg.tasks {
        let dir = originals::hf_model_dir(job, &task.name);
        let vit = Vit::load(&dir)?;
        check_classifier(
            &dir,
            task,
            vit.classifier.as_ref().map(|c| c.w.size()[0] as usize),
        )?;
        if vit.cfg.image_size != side || vit.cfg.num_channels != 1 {
            bail!(Error::Checkpoint {
                file: dir.join("config.json"),
                msg: format!(
                    "image_size {} with {} channels; the data has {side}×{side} grey images",
                    vit.cfg.image_size, vit.cfg.num_channels
                ),
            });
        }
        models.push(vit);
    }
    Ok(models)
}

/// Run the ViT merge job: FS-Merge on the workers of the plan when the job is distributed
/// (several stages or replicas, workers started separately, or NCCL/GPU workers), else in this
/// process.
pub fn run(job: &Job, launch: &Launch, resume: bool) -> Result<()> {
    let started = Instant::now();
    let cfg = &job.cfg;
    let m = &cfg.merge;
    let distributed = cluster::is_distributed(cfg, launch);
    if resume && !distributed {
        tracing::warn!(
            "--resume: a ViT merge in one process keeps no checkpoints; the job starts over"
        );
    }
    let (splits, set) = prepare(job)?;
    let models = load_models(job)?;
    let refs: Vec<&Vit> = models.iter().collect();
    check_rank(m.rank, models[0].cfg.hidden_size)?;
    let plan = Plan::balanced(
        family(cfg.model.arch).unit_costs(cfg, &job.models_dir)?,
        cfg.cluster.stages,
        cfg.cluster.replicas,
    )?;
    tracing::info!("plan: {}", plan.describe());

    let test = EvalSet::new(&splits.test, &cfg.tasks);
    let val = EvalSet::new(&splits.val, &cfg.tasks);
    let ev = Evaluator::new(&test, &val, job.task_names());
    let reporter = Reporter::new();
    let mut results = Vec::new();
    let mut log: Vec<LogRow> = Vec::new();
    for (t, model) in models.iter().enumerate() {
        results.push(ev.original(t, &|x| original_logits(model, x)));
    }

    let local = m.mode != Mode::Global;
    let clock = Instant::now();
    // In this process FS-Merge trains on the teacher; distributed, the workers build their own
    // and KD needs only the pooled outputs here.
    let teacher = if distributed {
        VitTeacher::new(&refs, &set, false, &[])
    } else {
        VitTeacher::new(&refs, &set, local, &m.inner_layers)
    };
    let teacher_seconds = if distributed {
        0.0
    } else {
        clock.elapsed().as_secs_f64()
    };
    let settings = TrainSettings::of(m, cfg.seed);
    for b in &cfg.baselines.methods {
        let clock = Instant::now();
        let merged_row = |name: &str, v, merged: &MergedVit, seconds| {
            ev.result(name, v, seconds, &|x| merged.logits(x))
        };
        let r = match b {
            Baseline::Ensemble => ev.result("ensemble", BTreeMap::new(), 0.0, &|x| {
                refs.iter().map(|m| original_logits(m, x)).collect()
            }),
            Baseline::First => {
                merged_row("first", BTreeMap::new(), &vit_baselines::first(&refs), 0.0)
            }
            Baseline::Average => {
                let merged = vit_baselines::average(&refs);
                merged_row(
                    "average",
                    BTreeMap::new(),
                    &merged,
                    clock.elapsed().as_secs_f64(),
                )
            }
            Baseline::Regmean => {
                let merged = vit_baselines::regmean(&refs, &set, cfg.baselines.regmean_alpha)?;
                let v = variant(&[("alpha", json!(cfg.baselines.regmean_alpha))]);
                merged_row("regmean", v, &merged, clock.elapsed().as_secs_f64())
            }
            Baseline::Kd => {
                let (s, v) = kd_settings(m, &settings);
                let (merged, rows) = vit_baselines::kd(
                    &refs,
                    &set,
                    &teacher.pooled,
                    cfg.baselines.kd_target_scale,
                    &s,
                    &reporter,
                )?;
                log.extend(rows);
                merged_row("kd", v, &merged, clock.elapsed().as_secs_f64())
            }
        };
        results.push(r);
    }

    let clock = Instant::now();
    let mut v = fs_merge_variant(m);
    if !m.inner_layers.is_empty() {
        v.insert("inner_layers".into(), json!(m.inner_layers));
    }
    let heads: Vec<&Linear> = models
        .iter()
        .filter_map(|m| m.classifier.as_ref())
        .collect();
    let (merged, workers) = if distributed {
        let outcome = cluster::run(job, &plan, launch, resume)?;
        warn_if_global_rose(&outcome.log, m.lr);
        log.extend(outcome.log);
        if local {
            let sn = with_mu_seed(cfg.seed, || {
                VitSuperNet::new(&refs, m.mu_type, m.init, m.rank)
            })?;
            restore_local_phase(job, &plan, sn.named_params())?;
            report_local_phase(local_rows(&sn, &heads, &ev), m.mode, &mut v, &mut results);
        }
        let merged = assemble(job, &models[0].cfg, outcome.tensors)?;
        (merged, outcome.workers)
    } else {
        let merged = train_in_process(
            job,
            &refs,
            &heads,
            &set,
            &teacher,
            &ev,
            &mut v,
            &mut results,
            &mut log,
            &reporter,
        )?;
        (merged, Vec::new())
    };
    let seconds = clock.elapsed().as_secs_f64() + teacher_seconds;
    results.push(ev.result("fs-merge", v.clone(), seconds, &|x| merged.logits(x)));

    report::write(job, &plan, results, &log, started, workers, &|st| {
        write_model(st, job, &merged, &v)
    })
}

/// FS-Merge in this process on the whole SuperNet; in local modes also the result rows of the
/// local SuperNet and its fold after the local phase, and their gap in the variant.
#[allow(clippy::too_many_arguments)]
fn train_in_process(
    job: &Job,
    refs: &[&Vit],
    heads: &[&Linear],
    set: &MergeSet,
    teacher: &VitTeacher,
    ev: &Evaluator,
    v: &mut BTreeMap<String, serde_json::Value>,
    results: &mut Vec<MethodResult>,
    log: &mut Vec<LogRow>,
    reporter: &Reporter,
) -> Result<MergedVit> {
    let cfg = &job.cfg;
    let m = &cfg.merge;
    let settings = TrainSettings::of(m, cfg.seed);
    let sn = with_mu_seed(cfg.seed, || {
        VitSuperNet::new(refs, m.mu_type, m.init, m.rank)
    })?;
    let loss = VitLoss {
        sn: &sn,
        teacher,
        set,
        targets: m.targets,
        form: m.step_form,
        inner_layers: &m.inner_layers,
        inner_weight: m.inner_weight,
        res_consistency: m.res_consistency,
    };
    if m.mode != Mode::Global {
        log.extend(vit_merge::train_local(&loss, &settings, reporter)?);
        report_local_phase(local_rows(&sn, heads, ev), m.mode, v, results);
    }
    if m.mode != Mode::Local {
        let s = settings.global_phase(m);
        log.extend(vit_merge::train_global(&loss, &s, reporter)?);
        warn_if_global_rose(log, m.lr);
    }
    let (vit, merged_heads) = sn.merged(heads);
    Ok(MergedVit {
        vit,
        heads: merged_heads,
    })
}

/// The merged ViT from the stages' folded tensors (HF names without the `vit.` prefix, and
/// each task's head).
fn assemble(
    job: &Job,
    cfg: &VitConfig,
    mut tensors: BTreeMap<String, HostTensor>,
) -> Result<MergedVit> {
    let heads = take_heads(job, &mut tensors)?;
    let units = 0..cfg.num_hidden_layers + 1;
    let vit = VitPart::from_tensors(cfg.clone(), units, "", tensors)
        .context("assembling the merged ViT from the workers' folded tensors")?
        .into_vit()?;
    Ok(MergedVit { vit, heads })
}

/// After local training: the rows of the local SuperNet as trained (U_res/M_res round trip
/// between blocks) and of the folded model it yields.
fn local_rows(sn: &VitSuperNet, heads: &[&Linear], ev: &Evaluator) -> (MethodResult, MethodResult) {
    let (vit, merged_heads) = sn.merged(heads);
    let folded = MergedVit {
        vit,
        heads: merged_heads,
    };
    local_gap(
        ev,
        heads,
        &|x| chunked(x, 1, |c| sn.forward_local_chain(&vit_merge::images(c))),
        &|x| folded.logits(x),
    )
}

/// The merged ViT in HF layout (`merged/`: config.json + model.safetensors, one classifier of
/// every task's classes) and `merged/fsmerge.json` (each task's slice of the logits).
fn write_model(
    st: &Staging,
    job: &Job,
    merged: &MergedVit,
    v: &BTreeMap<String, serde_json::Value>,
) -> Result<()> {
    let (labels, tasks) = stacked_labels(job, &|c| format!("class {c}"));
    let dir = st.path("merged");
    merged.joint_checkpoint().save(&dir, &labels)?;
    write_json(
        &dir.join("fsmerge.json"),
        &json!({"method": "fs-merge", "variant": v, "tasks": tasks, "input": "square grey images, normalised as fsmerge's data loader does"}),
    )?;
    Ok(())
}
