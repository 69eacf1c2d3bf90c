//! The baselines of the results table for BERTs (method.md §13): `first` and weight averaging.
//! Each task keeps its own classifier.

use crate::bert::Bert;
use crate::bert_merge::MergedBert;
use crate::mlp::{own_heads, Linear};
use crate::tensor::set_to_mean;
use tch::Tensor;

fn heads_of(models: &[&Bert]) -> Vec<Linear> {
    own_heads(models.iter().map(|m| m.classifier.as_ref()))
}

/// A copy of `model` without its classifier.
fn encoder_of(model: &Bert) -> Bert {
    let mut b = model.copy();
    b.classifier = None;
    b
}

/// Model 1's encoder for every task.
pub fn first(models: &[&Bert]) -> MergedBert {
    MergedBert {
        bert: encoder_of(models[0]),
        heads: heads_of(models),
    }
}

/// Element-wise mean of every encoder tensor (embedding tables included).
pub fn average(models: &[&Bert]) -> MergedBert {
    let bert = encoder_of(models[0]);
    let all: Vec<Vec<(String, &Tensor)>> = models.iter().map(|m| m.encoder_tensors()).collect();
    set_to_mean(&bert.encoder_tensors(), &all);
    MergedBert {
        bert,
        heads: heads_of(models),
    }
}
