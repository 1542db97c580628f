//! Prunes SmolLM2-135M to 2:4 and exports it in Hugging Face layout and in the compressed N:M format, checking the round trip.
//!
//! usage: cargo run --release -p prunec-runtime --example llm_export -- [--method magnitude|wanda] [--out DIR]
//! Wanda calibrates on 32 x 256 tokens of State of the Union addresses (seed 0).

use prunec_runtime::llm::{self, data, OneShotConfig, SparsityPattern};
use std::time::Instant;

fn main() {
    if let Err(e) = run() {
        eprintln!("llm_export: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut method = "magnitude".to_string();
    let mut out = std::path::PathBuf::from("out/llm-2-4");
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--method" => method = args.next().ok_or("--method needs a value")?,
            "--out" => out = args.next().ok_or("--out needs a value")?.into(),
            other => return Err(format!("unknown argument `{other}`").into()),
        }
    }
    let mut model = llm::load_gguf(&data::smollm2_gguf()?)?;
    let tok = model.tokenizer.clone().ok_or("no tokenizer")?;
    let config = OneShotConfig::new(SparsityPattern::NofM { n: 2, m: 4 });
    let t = Instant::now();
    let report = match method.as_str() {
        "magnitude" => llm::prune_one_shot(&mut model, &[], &config, &mut llm::MagnitudePruner)?,
        "wanda" => {
            let calib = llm::calibration_windows(&tok, &data::sotu_files()?, 32, 256, 0)?;
            llm::prune_one_shot(&mut model, &calib, &config, &mut llm::WandaPruner)?
        }
        other => return Err(format!("unknown method `{other}` (magnitude, wanda)").into()),
    };
    eprintln!(
        "{method} 2:4: sparsity {:.4} in {:.1}s",
        report.sparsity(),
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let hf_bytes = llm::save_hf(&model, &out.join("hf"))?;
    let hf_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let packed = out.join("model-2-4.prunec");
    let size = llm::save_compressed(&model, &packed, 2, 4)?;
    let packed_s = t.elapsed().as_secs_f64();
    let back = llm::load_compressed(&packed)?;
    let hf_back = llm::load_hf(&out.join("hf"))?;
    for other in [&back, &hf_back] {
        for ((name, a), (_, b)) in model.named_tensors()?.iter().zip(other.named_tensors()?) {
            let a: Vec<f32> = a.flatten_all()?.to_vec1()?;
            let b: Vec<f32> = b.flatten_all()?.to_vec1()?;
            if a.iter().zip(&b).any(|(x, y)| x.to_bits() != y.to_bits()) || a.len() != b.len() {
                return Err(format!("{name} differs after the round trip").into());
            }
        }
    }
    println!(
        "HF safetensors (f32): {hf_bytes} bytes ({:.1} MB) in {hf_s:.1}s\n\
         compressed 2:4: {} bytes ({:.1} MB) in {packed_s:.1}s; {} tensors 2:4, {} dense; \
         both reload bit-exactly",
        hf_bytes as f64 / 1e6,
        size.bytes,
        size.bytes as f64 / 1e6,
        size.nm_tensors,
        size.dense_tensors
    );
    Ok(())
}
