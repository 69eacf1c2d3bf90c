//! The SuperNet's contracts: folding is exact for every M/U type, `first` reproduces model 1,
//! the literal and folded global steps agree in loss and gradients, local problems are
//! independent, and training lowers the reconstruction loss.

use fsmerge_common::config::{Init, MuType, StepForm, Targets};
use fsmerge_worker::core::linear::Linear;
use fsmerge_worker::core::tensor::{rel_err, F32};
use fsmerge_worker::data::merge_set::MergeSet;
use fsmerge_worker::families::mlp::merge;
use fsmerge_worker::families::mlp::model::{body_forward, Mlp};
use fsmerge_worker::families::mlp::supernet::SuperNet;
use fsmerge_worker::train::progress::Silent;
use fsmerge_worker::train::settings::TrainSettings;
use tch::{Kind, Tensor};

const TYPES: [MuType; 4] = [
    MuType::Diagonal,
    MuType::LowRank,
    MuType::DiagonalAndLowRank,
    MuType::Full,
];

fn models(n: usize, seed: i64) -> Vec<Mlp> {
    tch::manual_seed(seed);
    (0..n).map(|_| Mlp::init(12, &[10, 10, 10], 3)).collect()
}

/// Replace every M/U tensor by random values (well away from any init structure).
fn randomize(sn: &SuperNet) {
    tch::no_grad(|| {
        for mut p in sn.params() {
            let r = Tensor::randn(p.size(), F32) * 0.5;
            p.copy_(&r);
        }
    });
}

fn set(n_tasks: usize, per_task: usize, dim: i64) -> MergeSet {
    let n = (n_tasks * per_task) as i64;
    MergeSet {
        x: Tensor::randn([n, dim], F32),
        task: Tensor::arange(n, (Kind::Int64, tch::Device::Cpu))
            .divide_scalar_mode(per_task as i64, "floor"),
        per_task: vec![per_task; n_tasks],
    }
}

#[test]
fn folding_is_exact_for_every_type() {
    for n in [2, 3] {
        for ty in TYPES {
            let ms = models(n, 1);
            let refs: Vec<&Mlp> = ms.iter().collect();
            let init = if ty == MuType::LowRank {
                Init::Random
            } else {
                Init::Average
            };
            let sn = SuperNet::new(&refs, ty, init, 4).unwrap();
            randomize(&sn);
            let x = Tensor::randn([7, 12], F32);
            let literal = tch::no_grad(|| sn.forward_literal(&x));
            // The folded plain MLP with each task's read-out folded into its head.
            let heads: Vec<&Linear> = refs.iter().map(|m| &m.head).collect();
            let (body, folded_heads) = sn.fold_to_mlp(&heads);
            let h = tch::no_grad(|| body_forward(&body, &x));
            for t in 0..n {
                let expect = tch::no_grad(|| refs[t].head.forward(&literal.get(t as i64)));
                let got = tch::no_grad(|| folded_heads[t].forward(&h));
                let e = rel_err(&got, &expect);
                assert!(e <= 1e-5, "{ty:?} n={n} task {t}: relative error {e}");
            }
            // And the unmerged outputs themselves.
            let via_fold = tch::no_grad(|| sn.forward_fold(&x));
            assert!(
                rel_err(&via_fold, &literal) <= 1e-5,
                "{ty:?}: forward_fold differs"
            );
        }
    }
}

#[test]
fn first_init_reproduces_model_one() {
    for ty in [MuType::Diagonal, MuType::DiagonalAndLowRank, MuType::Full] {
        let ms = models(3, 2);
        let refs: Vec<&Mlp> = ms.iter().collect();
        let sn = SuperNet::new(&refs, ty, Init::First, 4).unwrap();
        let x = Tensor::randn([9, 12], F32);
        let out = tch::no_grad(|| sn.forward_literal(&x));
        let f1 = tch::no_grad(|| ms[0].body_forward(&x));
        for t in 0..3 {
            assert!(
                rel_err(&out.get(t), &f1) <= 1e-6,
                "{ty:?}: slice {t} is not model 1's features"
            );
        }
    }
}

#[test]
fn literal_and_fold_give_same_loss_and_gradients() {
    for ty in TYPES {
        for targets in [Targets::Own, Targets::All] {
            let ms = models(2, 3);
            let refs: Vec<&Mlp> = ms.iter().collect();
            let init = if ty == MuType::LowRank {
                Init::Random
            } else {
                Init::First
            };
            let sn = SuperNet::new(&refs, ty, init, 4).unwrap();
            randomize(&sn);
            let data = set(2, 8, 12);
            let feats = merge::teacher_features(&refs, &data.x);
            let idx = Tensor::arange(16, (Kind::Int64, tch::Device::Cpu));
            let params = sn.params();
            let l1 = merge::global_loss(&sn, &data, &feats, &idx, targets, StepForm::Literal);
            let g1 = Tensor::run_backward(&[&l1], &params, false, false);
            let l2 = merge::global_loss(&sn, &data, &feats, &idx, targets, StepForm::Fold);
            let g2 = Tensor::run_backward(&[&l2], &params, false, false);
            assert!(rel_err(&l2, &l1) <= 1e-5, "{ty:?}: losses differ");
            for (a, b) in g2.iter().zip(&g1) {
                let e = rel_err(a, b);
                assert!(e <= 1e-4, "{ty:?} {targets:?}: gradient relative error {e}");
            }
        }
    }
}

#[test]
fn local_problems_are_independent() {
    let ms = models(2, 4);
    let refs: Vec<&Mlp> = ms.iter().collect();
    let data = set(2, 32, 12);
    let feats = merge::teacher_features(&refs, &data.x);
    let s = TrainSettings {
        epochs: 3,
        lr: 1e-2,
        weight_decay: 1e-3,
        batch_size: 16,
        targets: Targets::All,
        form: StepForm::Fold,
        seed: 5,
    };
    // Both runs start layer 1 from the same values (copied, since tests share the global RNG).
    let init: Vec<Tensor> = {
        let sn = SuperNet::new(&refs, MuType::DiagonalAndLowRank, Init::First, 4).unwrap();
        sn.mu[1]
            .params()
            .iter()
            .map(|p| p.detach().copy())
            .collect()
    };
    let train_layer1 = |poison: bool| {
        let sn = SuperNet::new(&refs, MuType::DiagonalAndLowRank, Init::First, 4).unwrap();
        tch::no_grad(|| {
            for (mut p, v) in sn.mu[1].params().into_iter().zip(&init) {
                p.copy_(v);
            }
            if poison {
                // Other problems' state is garbage: layer 1's result must not change.
                for l in [0, 2] {
                    for mut p in sn.mu[l].params() {
                        let _ = p.fill_(f64::NAN);
                    }
                }
            }
        });
        merge::train_local_layer(&sn, 1, &data, &feats, &s, &Silent).unwrap();
        sn.mu[1].params()
    };
    let clean = train_layer1(false);
    let poisoned = train_layer1(true);
    for (a, b) in clean.iter().zip(&poisoned) {
        assert!(a.isfinite().all().int64_value(&[]) == 1);
        assert_eq!(rel_err(a, b), 0.0);
    }
}

#[test]
fn training_lowers_reconstruction_loss() {
    let ms = models(2, 6);
    let refs: Vec<&Mlp> = ms.iter().collect();
    let data = set(2, 64, 12);
    let feats = merge::teacher_features(&refs, &data.x);
    let s = TrainSettings {
        epochs: 20,
        lr: 1e-2,
        weight_decay: 1e-3,
        batch_size: 32,
        targets: Targets::All,
        form: StepForm::Fold,
        seed: 1,
    };
    let sn = SuperNet::new(&refs, MuType::DiagonalAndLowRank, Init::First, 4).unwrap();
    for l in 0..3 {
        let before = merge::local_loss_full(&sn, l, &data, &feats, Targets::All);
        merge::train_local_layer(&sn, l, &data, &feats, &s, &Silent).unwrap();
        let after = merge::local_loss_full(&sn, l, &data, &feats, Targets::All);
        assert!(after < 0.7 * before, "local layer {l}: {before} → {after}");
    }
    let before = merge::global_loss_full(&sn, &data, &feats, Targets::Own);
    merge::train_global(
        &sn,
        &data,
        &feats,
        &TrainSettings {
            targets: Targets::Own,
            ..s
        },
        &Silent,
    )
    .unwrap();
    let after = merge::global_loss_full(&sn, &data, &feats, Targets::Own);
    assert!(after < before, "global: {before} → {after}");
}
