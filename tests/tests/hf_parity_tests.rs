//! Forward parity with Python `transformers`: tiny random-initialized ViTs saved by
//! transformers (one single-file `ViTModel`, one sharded `ViTForImageClassification`) load in
//! fsmerge and reproduce every hidden state and the logits within 1e-4.

use fsmerge_common::checkpoint::read_tensors;
use fsmerge_tests::root;
use fsmerge_worker::core::tensor::{rel_err, to_tch};
use fsmerge_worker::families::vit::model::Vit;
use std::path::Path;

fn reference(dir: &Path, names: &[String]) -> Vec<tch::Tensor> {
    let t = read_tensors(&dir.join("reference.safetensors"), names).unwrap();
    names.iter().map(|n| to_tch(&t[n])).collect()
}

#[test]
fn vit_matches_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(root().join(".venv/bin/python"))
        .arg(root().join("tests/fixtures/make_vit.py"))
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for name in ["vit-model", "vit-classifier"] {
        let dir = tmp.path().join(name);
        let vit = Vit::load(&dir).unwrap();
        let layers = vit.cfg.num_hidden_layers;
        let mut names = vec!["pixel_values".to_string()];
        names.extend((0..layers).map(|i| format!("hidden.{i}")));
        let r = reference(&dir, &names);
        let (states, last) = vit.forward(&r[0]);
        for i in 0..layers {
            let e = rel_err(&states[i], &r[1 + i]);
            assert!(e < 1e-4, "{name}: hidden state {i} differs by {e:e}");
            println!("{name}: hidden state {i} relative difference {e:.1e}");
        }
        let out = if name == "vit-model" {
            "last_hidden_state"
        } else {
            "logits"
        };
        let want = &reference(&dir, &[out.to_string()])[0];
        let got = if name == "vit-model" {
            last
        } else {
            vit.logits(&r[0]).unwrap()
        };
        let e = rel_err(&got, want);
        assert!(e < 1e-4, "{name}: {out} differs by {e:e}");
    }
}

#[test]
fn unknown_architecture_and_missing_tensor_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        r#"{"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 16, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
            "image_size": 8, "patch_size": 4, "num_channels": 1}"#,
    )
    .unwrap();
    let e = Vit::load(tmp.path()).err().unwrap().to_string();
    assert!(
        e.contains("config.json") && e.contains("model_type `bert`"),
        "{e}"
    );
    std::fs::write(tmp.path().join("config.json"), r#"{"model_type": "vit"}"#).unwrap();
    let e = Vit::load(tmp.path()).err().unwrap().to_string();
    assert!(
        e.contains("config.json") && e.contains("hidden_size"),
        "{e}"
    );
}

/// BERT: a tiny random-initialized `BertModel` (padding in two of three rows) and the real
/// all-MiniLM-L6-v2 (data/, installed by deploy/setup.sh) reproduce transformers' hidden states,
/// and MiniLM's sentence embeddings give the cosines data.md lists.
#[test]
fn bert_and_minilm_match_transformers() {
    use fsmerge_worker::families::bert::model::Bert;
    let tmp = tempfile::tempdir().unwrap();
    let minilm = root().join("data/all-MiniLM-L6-v2");
    let o = std::process::Command::new(root().join(".venv/bin/python"))
        .arg(root().join("tests/fixtures/make_bert.py"))
        .arg(tmp.path())
        .arg(&minilm)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (name, weights) in [
        ("bert-tiny", tmp.path().join("bert-tiny")),
        ("bert-cls", tmp.path().join("bert-cls")),
        ("minilm", minilm.clone()),
    ] {
        let bert = Bert::load(&weights).unwrap();
        let layers = bert.cfg.num_hidden_layers;
        let mut names = vec!["input_ids".to_string(), "attention_mask".to_string()];
        names.extend((0..=layers).map(|i| format!("hidden.{i}")));
        let r = reference(&tmp.path().join(name), &names);
        let ids = r[0].to_kind(tch::Kind::Int64);
        let mask = r[1].to_kind(tch::Kind::Int64);
        let states = bert.forward(&ids, &mask);
        // Padded positions are garbage in both; compare real tokens only.
        let keep = mask.unsqueeze(-1).to_kind(tch::Kind::Float);
        for i in 0..=layers {
            let e = rel_err(&(&states[i] * &keep), &(&r[2 + i] * &keep));
            assert!(e < 1e-4, "{name}: hidden state {i} differs by {e:e}");
            println!("{name}: hidden state {i} relative difference {e:.1e}");
        }
        if name == "bert-cls" {
            // BertForSequenceClassification: the `bert.` prefix, the pooler and the head.
            let want = reference(&tmp.path().join(name), &["logits".to_string()]);
            let got = bert.logits(&ids, &mask).expect("a classifier was loaded");
            let e = rel_err(&got, &want[0]);
            assert!(e < 1e-4, "bert-cls: logits differ by {e:e}");
            println!("bert-cls: logits relative difference {e:.1e}");
            // Saved again (the `bert.` layout, with its head), it loads to the same logits.
            let again = tmp.path().join("bert-cls-saved");
            bert.save(&again, &[]).unwrap();
            let reloaded = Bert::load(&again).unwrap();
            let e = rel_err(&reloaded.logits(&ids, &mask).unwrap(), &got);
            assert!(
                e == 0.0,
                "bert-cls saved and reloaded: logits differ by {e:e}"
            );
        }
        if name == "minilm" {
            let emb = bert.sentence_embeddings(&ids, &mask);
            let cos = emb.matmul(&emb.tr());
            let related = cos.double_value(&[0, 1]);
            println!("minilm sentence cosines: {cos:.3}");
            assert!((related - 0.755).abs() < 0.01, "eating pair: {related}");
            for (a, b) in [(0, 2), (0, 3), (2, 3)] {
                let c = cos.double_value(&[a, b]);
                assert!(c < 0.11, "unrelated pair ({a}, {b}): {c}");
            }
        }
    }
}
