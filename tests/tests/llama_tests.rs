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
