//! The ViT SuperNet (method.md §4): `first` init reproduces model 1, folding is exact for random
//! M/U of every type, the literal and folded steps give the same loss and gradients, and the
//! local problems' residual round trip starts as the identity.

use fsmerge_common::config::{Init, MuType, StepForm, VitShape};
use fsmerge_common::hf::VitConfig;
use fsmerge_worker::core::tensor::{rel_err, F32};
use fsmerge_worker::families::vit::model::Vit;
use fsmerge_worker::families::vit::supernet::VitSuperNet;
use fsmerge_worker::train::optim::gradients;
use tch::Tensor;

fn models(n: usize) -> Vec<Vit> {
    let shape = VitShape {
        patch_size: 7,
        width: 16,
        layers: 2,
        heads: 4,
        mlp_dim: 32,
    };
    (0..n)
        .map(|i| {
            tch::manual_seed(10 + i as i64);
            let mut m = Vit::init(VitConfig::for_images(&shape, 28), 3);
            // Move the LayerNorms off (1, 0) so that LN handling is exercised.
            tch::no_grad(|| {
                for b in &mut m.blocks {
                    let _ = b.ln_attn.w.g_add_(&(Tensor::randn([16], F32) * 0.3));
                    let _ = b.ln_mlp.b.g_add_(&(Tensor::randn([16], F32) * 0.3));
                }
            });
            m
        })
        .collect()
}

fn pixels() -> Tensor {
    tch::manual_seed(99);
    Tensor::randn([5, 1, 28, 28], F32)
}

/// Give every trainable tensor random values (a SuperNet far from any init).
fn randomise(sn: &VitSuperNet) {
    tch::no_grad(|| {
        for mut p in sn.local_params() {
            let _ = p.g_add_(&(p.randn_like() * 0.3));
        }
    });
}

#[test]
fn first_init_reproduces_model_one_in_every_slice() {
    let ms = models(3);
    let refs: Vec<&Vit> = ms.iter().collect();
    let x = pixels();
    let want = tch::no_grad(|| ms[0].pooled(&x));
    for mu_type in [
        MuType::Diagonal,
        MuType::DiagonalAndLowRank,
        MuType::Full,
        MuType::AttHeads,
    ] {
        tch::manual_seed(0);
        let sn = VitSuperNet::new(&refs, mu_type, Init::First, 4).unwrap();
        for form in [StepForm::Literal, StepForm::Fold] {
            let (pred, _) = tch::no_grad(|| sn.forward(&x, form, &[]));
            for t in 0..3 {
                let e = rel_err(&pred.get(t), &want);
                assert!(e < 1e-5, "{mu_type:?} {form:?} slice {t}: {e}");
            }
        }
        let chain = tch::no_grad(|| sn.forward_local_chain(&x));
        assert!(rel_err(&chain.get(1), &want) < 1e-5, "{mu_type:?} chain");
    }
}

#[test]
fn folding_is_exact_for_random_mu_of_every_type() {
    let ms = models(2);
    let refs: Vec<&Vit> = ms.iter().collect();
    let x = pixels();
    for (mu_type, init) in [
        (MuType::DiagonalAndLowRank, Init::Random),
        (MuType::Diagonal, Init::Average),
        (MuType::Full, Init::Random),
        (MuType::LowRank, Init::Random),
        (MuType::AttHeads, Init::First),
    ] {
        tch::manual_seed(1);
        let sn = VitSuperNet::new(&refs, mu_type, init, 4).unwrap();
        randomise(&sn);
        let (literal, _) = tch::no_grad(|| sn.forward(&x, StepForm::Literal, &[]));
        let heads: Vec<_> = ms.iter().map(|m| m.classifier.as_ref().unwrap()).collect();
        let (vit, merged_heads) = sn.merged(&heads);
        let pooled = tch::no_grad(|| vit.pooled(&x));
        for t in 0..2 {
            // The folded ViT + the head with U_final folded in = the SuperNet's slice t + head t.
            let want = tch::no_grad(|| heads[t].forward(&literal.get(t as i64)));
            let got = tch::no_grad(|| merged_heads[t].forward(&pooled));
            let e = rel_err(&got, &want);
            assert!(e < 1e-4, "{mu_type:?}/{init:?} task {t}: {e}");
        }
    }
}

#[test]
fn literal_and_fold_give_the_same_loss_and_gradients() {
    let ms = models(2);
    let refs: Vec<&Vit> = ms.iter().collect();
    let x = pixels();
    let target = Tensor::randn([2, 5, 16], F32);
    for mu_type in [MuType::DiagonalAndLowRank, MuType::AttHeads] {
        tch::manual_seed(2);
        let sn = VitSuperNet::new(&refs, mu_type, Init::First, 4).unwrap();
        randomise(&sn);
        let params = sn.global_params();
        let run = |form| {
            let (pred, _) = sn.forward(&x, form, &[]);
            let loss = (pred - &target).square().mean(None);
            let g = gradients(&loss, &params).unwrap();
            (loss.double_value(&[]), g)
        };
        let (l1, g1) = run(StepForm::Literal);
        let (l2, g2) = run(StepForm::Fold);
        assert!(
            (l1 - l2).abs() / l1.abs() < 1e-5,
            "{mu_type:?}: {l1} vs {l2}"
        );
        for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
            let e = rel_err(b, a);
            assert!(
                e < 1e-3,
                "{mu_type:?} parameter {i}: gradient differs by {e}"
            );
        }
    }
}

#[test]
fn inner_branches_match_the_original_at_first_init() {
    let ms = models(2);
    let refs: Vec<&Vit> = ms.iter().collect();
    let x = pixels();
    tch::manual_seed(3);
    let sn = VitSuperNet::new(&refs, MuType::DiagonalAndLowRank, Init::First, 4).unwrap();
    let (_, branches) = tch::no_grad(|| sn.forward(&x, StepForm::Fold, &[1]));
    let (_, attn) = tch::no_grad(|| ms[0].trace(&x));
    // At `first` init branch 0 of block 1 is model 1's attention output.
    let got = branches[0].get(0).view([5, -1, 16]);
    assert!(rel_err(&got, &attn[1]) < 1e-5);
}
