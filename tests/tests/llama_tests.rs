//! The Llama-family forward against transformers: tiny models with grouped-query attention
//! written by `save_pretrained` (`tests/fixtures/make_llama.py`), a causal LM and a sequence
//! classifier (biases, another `rope_theta`), right-padded rows; fsmerge's logits must match
//! within 1e-4 of the largest.

use fsmerge_common::checkpoint::read_tensors;
use fsmerge_tests::python_fixture;
use fsmerge_worker::core::tensor::{rel_err, to_tch};
use fsmerge_worker::families::llama::model::Llama;
use tch::Kind;

#[test]
fn llama_forward_matches_transformers() {
    let dir = tempfile::tempdir().unwrap();
    println!("{}", python_fixture("make_llama.py", &[dir.path()]));
    for name in ["causal", "seqcls"] {
        let path = dir.path().join(name);
        let model = Llama::load(&path).unwrap();
        let names = ["input_ids", "attention_mask", "logits"].map(String::from);
        let r = read_tensors(&path.join("reference.safetensors"), &names).unwrap();
        let ids = to_tch(&r["input_ids"]).to_kind(Kind::Int64);
        let mask = to_tch(&r["attention_mask"]);
        let want = to_tch(&r["logits"]);
        let got = tch::no_grad(|| match name {
            "causal" => model.lm_logits(&ids, &mask),
            _ => model.sequence_logits(&ids, &mask),
        })
        .unwrap();
        // Padded positions attend to nothing real: compare at the tokens.
        let (got, want) = if name == "causal" {
            let keep = mask.reshape([-1]).nonzero().squeeze_dim(1);
            let flat = |t: &tch::Tensor| t.reshape([-1, t.size()[2]]).index_select(0, &keep);
            (flat(&got), flat(&want))
        } else {
            (got, want)
        };
        let err = rel_err(&got, &want);
        println!("{name}: relative difference {err:.2e}");
        assert!(err < 1e-4, "{name}: {err:e}");
    }
}

/// Two Llamas written by transformers merged by the SuperNet (its M/U moved off their init):
/// each task's folded model — the one merged body with that task's LM head read through
/// U_final — saved by fsmerge, loads in transformers and gives the SuperNet's logits.
#[test]
fn a_folded_llama_loads_in_transformers_and_gives_the_supernets_logits() {
    use fsmerge_common::config::{Init, MuType, StepForm};
    use fsmerge_worker::core::tensor::to_host;
    use fsmerge_worker::families::llama::supernet::LlamaSuperNet;
    let dir = tempfile::tempdir().unwrap();
    python_fixture("make_llama.py", &[dir.path()]);
    let models: Vec<Llama> = ["causal", "causal2"]
        .iter()
        .map(|m| Llama::load(&dir.path().join(m)).unwrap())
        .collect();
    let refs: Vec<&Llama> = models.iter().collect();
    tch::manual_seed(0);
    let sn = LlamaSuperNet::new(&refs, MuType::DiagonalAndLowRank, Init::First, 4).unwrap();
    tch::no_grad(|| {
        for mut p in sn.params() {
            let _ = p.g_add_(&(p.randn_like() * 0.05));
        }
    });
    let names = ["input_ids", "attention_mask"].map(String::from);
    let mut r = read_tensors(&dir.path().join("causal/reference.safetensors"), &names).unwrap();
    let ids = to_tch(&r["input_ids"]).to_kind(Kind::Int64);
    let mask = to_tch(&r["attention_mask"]);
    let recon = tch::no_grad(|| sn.forward(&ids, &mask, StepForm::Fold));
    for (t, original) in refs.iter().enumerate() {
        // Task t's logits in the SuperNet: its reconstruction through model t's own LM head.
        let head = original.lm_head.as_ref().unwrap();
        let want = recon.get(t as i64).matmul(&head.tr());
        let lm_heads: Vec<&tch::Tensor> =
            refs.iter().map(|m| m.lm_head.as_ref().unwrap()).collect();
        let (mut merged, mut heads) = sn.merged(&lm_heads).unwrap();
        merged.lm_head = Some(heads.swap_remove(t));
        let out = dir.path().join(format!("merged-{t}"));
        merged.save(&out).unwrap();
        r.insert("logits".to_string(), to_host(&want).unwrap());
        let reference = dir.path().join(format!("reference-{t}.safetensors"));
        fsmerge_common::checkpoint::write_tensors(&reference, &r).unwrap();
        println!(
            "{}",
            python_fixture("check_llama_merged.py", &[&out, &reference])
        );
    }
}
