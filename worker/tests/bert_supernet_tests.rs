//! The post-LN BERT SuperNet (method.md §5): `first` init reproduces model 1's pooled output in
//! every slice, folding into one BERT is exact for random M/U (also `att_heads`), with padding
//! masks, and the literal and folded steps give the same loss and gradients.

use fsmerge_common::config::{Init, MuType, StepForm};
use fsmerge_common::hf::BertConfig;
use fsmerge_worker::core::tensor::{rel_err, F32};
use fsmerge_worker::families::bert::model::Bert;
use fsmerge_worker::families::bert::supernet::BertSuperNet;
use fsmerge_worker::train::optim::gradients;
use tch::{Kind, Tensor};

/// libtorch's generator is global: tests of this binary run one at a time so that one test's
/// draws cannot land between another's seed and its draws (`parts_compose_to_the_whole_supernet`
/// compares two seeded draws for exact equality).
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn models(n: usize) -> Vec<Bert> {
    let cfg: BertConfig = serde_json::from_value(serde_json::json!({
        "model_type": "bert", "hidden_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 32, "hidden_act": "gelu",
        "layer_norm_eps": 1e-12, "vocab_size": 30, "max_position_embeddings": 12,
        "type_vocab_size": 2
    }))
    .unwrap();
    (0..n)
        .map(|i| {
            tch::manual_seed(20 + i as i64);
            let mut m = Bert::init(cfg.clone());
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

/// Token ids [3, 8] and a mask with padding in the last two sequences.
fn batch() -> (Tensor, Tensor) {
    tch::manual_seed(5);
    let ids = Tensor::randint(30, [3, 8], (Kind::Int64, tch::Device::Cpu));
    let mask = Tensor::ones([3, 8], (Kind::Int64, tch::Device::Cpu));
    let _ = mask.get(1).narrow(0, 6, 2).fill_(0);
    let _ = mask.get(2).narrow(0, 4, 4).fill_(0);
    (ids, mask)
}

fn randomise(sn: &BertSuperNet) {
    tch::no_grad(|| {
        for mut p in sn.params() {
            let _ = p.g_add_(&(p.randn_like() * 0.3));
        }
    });
}

#[test]
fn first_init_reproduces_model_one() {
    let _serial = serial();
    let ms = models(3);
    let refs: Vec<&Bert> = ms.iter().collect();
    let (ids, mask) = batch();
    let want = tch::no_grad(|| ms[0].pooled(&ids, &mask).unwrap());
    for mu_type in [MuType::DiagonalAndLowRank, MuType::Full, MuType::AttHeads] {
        tch::manual_seed(0);
        let sn = BertSuperNet::new(&refs, mu_type, Init::First, 4).unwrap();
        for form in [StepForm::Literal, StepForm::Fold] {
            let pred = tch::no_grad(|| sn.forward(&ids, &mask, form));
            for t in 0..3 {
                let e = rel_err(&pred.get(t), &want);
                assert!(e < 1e-5, "{mu_type:?} {form:?} slice {t}: {e}");
            }
        }
    }
}

#[test]
fn folding_is_exact_and_forms_agree() {
    let _serial = serial();
    let ms = models(2);
    let refs: Vec<&Bert> = ms.iter().collect();
    let (ids, mask) = batch();
    let target = Tensor::randn([2, 3, 16], F32);
    for (mu_type, init) in [
        (MuType::DiagonalAndLowRank, Init::Random),
        (MuType::Full, Init::Average),
        (MuType::AttHeads, Init::First),
    ] {
        tch::manual_seed(1);
        let sn = BertSuperNet::new(&refs, mu_type, init, 4).unwrap();
        randomise(&sn);
        // The folded BERT's pooled output read through U_final = the SuperNet's slices.
        let literal = tch::no_grad(|| sn.forward(&ids, &mask, StepForm::Literal));
        let folded = sn.fold().unwrap();
        let pooled = tch::no_grad(|| folded.pooled(&ids, &mask).unwrap());
        let u_final = &sn.mu.output.as_ref().unwrap().u_final;
        let read = tch::no_grad(|| u_final.unmerge(&pooled));
        let e = rel_err(&read, &literal);
        assert!(
            e < 1e-4,
            "{mu_type:?}/{init:?}: folded model differs by {e}"
        );
        // Same loss and gradients in both step forms.
        let params = sn.params();
        let run = |form| {
            let loss = (sn.forward(&ids, &mask, form) - &target)
                .square()
                .mean(None);
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

/// A pipeline stage's SuperNet part (`from_parts`) draws the single-process M/U values, and
/// the parts chained give the whole SuperNet's output and fold.
#[test]
fn parts_compose_to_the_whole_supernet() {
    let _serial = serial();
    use fsmerge_worker::families::bert::model::BertPart;
    use std::collections::BTreeMap;
    let ms = models(2);
    let refs: Vec<&Bert> = ms.iter().collect();
    let (ids, mask) = batch();
    let part_of = |m: &Bert, units: std::ops::Range<usize>| {
        let t: BTreeMap<String, Tensor> = m
            .encoder_tensors()
            .into_iter()
            .map(|(n, t)| (n, t.copy()))
            .collect();
        BertPart::from_tensors(m.cfg.clone(), units, "", t).unwrap()
    };
    let seeded = |f: &dyn Fn() -> BertSuperNet| fsmerge_worker::core::mu::with_mu_seed(7, f);
    let whole =
        seeded(&|| BertSuperNet::new(&refs, MuType::DiagonalAndLowRank, Init::Random, 4).unwrap());
    let whole_params: BTreeMap<String, Tensor> = whole.named_params().into_iter().collect();
    let want = tch::no_grad(|| whole.forward(&ids, &mask, StepForm::Literal));
    let mut folded = BTreeMap::new();
    let mut x = ids.shallow_clone();
    for units in [0..1, 1..2, 2..3] {
        let parts: Vec<BertPart> = ms.iter().map(|m| part_of(m, units.clone())).collect();
        let part_refs: Vec<&BertPart> = parts.iter().collect();
        let part = seeded(&|| {
            BertSuperNet::from_parts(&part_refs, MuType::DiagonalAndLowRank, Init::Random, 4)
                .unwrap()
        });
        for (name, p) in part.named_params() {
            assert!(
                rel_err(&p, &whole_params[&name]) == 0.0,
                "{units:?}: {name}"
            );
        }
        x = tch::no_grad(|| part.forward(&x, &mask, StepForm::Literal));
        folded.extend(part.fold_named());
    }
    let e = rel_err(&x, &want);
    assert!(e < 1e-6, "chained parts differ by {e}");
    let whole_fold = whole.fold_named();
    assert_eq!(folded.len(), whole_fold.len());
    for (name, t) in &whole_fold {
        assert!(rel_err(&folded[name], t) < 1e-6, "{name}");
    }
}
