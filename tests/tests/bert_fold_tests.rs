//! A BERT SuperNet folded by fsmerge is a standard HF `BertModel`: transformers loads it (no
//! missing or unexpected tensors) and its pooled output equals what fsmerge computes, which in
//! turn equals the SuperNet's read through U_final (worker/tests/bert_supernet_tests.rs).

use fsmerge_common::checkpoint::write_tensors;
use fsmerge_common::config::{Init, MuType};
use fsmerge_common::hf::BertConfig;
use fsmerge_tests::python_fixture;
use fsmerge_worker::core::tensor::to_host;
use fsmerge_worker::families::bert::model::Bert;
use fsmerge_worker::families::bert::supernet::BertSuperNet;
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

#[test]
fn folded_bert_loads_in_transformers_and_matches() {
    let cfg: BertConfig = serde_json::from_value(serde_json::json!({
        "model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "hidden_act": "gelu",
        "layer_norm_eps": 1e-12, "vocab_size": 40, "max_position_embeddings": 16,
        "type_vocab_size": 2
    }))
    .unwrap();
    let models: Vec<Bert> = (0..2)
        .map(|i| {
            tch::manual_seed(30 + i);
            Bert::init(cfg.clone())
        })
        .collect();
    let refs: Vec<&Bert> = models.iter().collect();
    tch::manual_seed(3);
    let sn = BertSuperNet::new(&refs, MuType::DiagonalAndLowRank, Init::Random, 4).unwrap();
    let folded = sn.fold().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bert");
    folded.save(&out, &[]).unwrap();

    let ids = Tensor::randint(40, [3, 10], (Kind::Int64, tch::Device::Cpu));
    let mask = Tensor::ones([3, 10], (Kind::Int64, tch::Device::Cpu));
    let _ = mask.get(2).narrow(0, 6, 4).fill_(0);
    let reloaded = Bert::load(&out).unwrap();
    let pooled = tch::no_grad(|| reloaded.pooled(&ids, &mask).unwrap());
    let mut reference = BTreeMap::new();
    for (name, t) in [
        ("input_ids", ids.to_kind(Kind::Float)),
        ("attention_mask", mask.to_kind(Kind::Float)),
        ("pooled", pooled),
    ] {
        reference.insert(name.to_string(), to_host(&t).unwrap());
    }
    let ref_file = dir.path().join("reference.safetensors");
    write_tensors(&ref_file, &reference).unwrap();
    println!(
        "{}",
        python_fixture("check_bert_folded.py", &[&out, &ref_file])
    );
}
