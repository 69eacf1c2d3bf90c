include!("../deploy/torch_link.rs");
