use std::path::Path;

use super::*;

const SMOLLM2: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
);

#[test]
fn smollm2s_headers_give_the_size_mlx_holds_it_in() {
    assert!(Path::new(SMOLLM2).exists(), "{SMOLLM2} is missing: run `make smollm2`");
    let e = estimate(Path::new(SMOLLM2)).unwrap().unwrap();
    // Measured: MLX's active memory with the file loaded quantised is 93.8 MiB.
    let mib = e.weight_bytes as f64 / (1 << 20) as f64;
    assert!((88.0..100.0).contains(&mib), "{mib} MiB");
    // 30 layers × 3 KV heads × 64 wide × keys and values × float32.
    assert_eq!(e.kv_bytes_per_token, 30 * 3 * 64 * 2 * 4);
    assert_eq!(e.total(2, 100), e.weight_bytes + 2 * 100 * e.kv_bytes_per_token);
}

#[test]
fn a_folder_is_sized_from_its_safetensors_headers_and_config() {
    let dir = tempfile::tempdir().unwrap();
    let header = br#"{"a":{"dtype":"F32","shape":[1000,1000],"data_offsets":[0,4000000]},"b":{"dtype":"F16","shape":[10],"data_offsets":[4000000,4000020]},"__metadata__":{"format":"mlx"}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header);
    std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64}"#,
    )
    .unwrap();
    let e = estimate(dir.path()).unwrap().unwrap();
    assert_eq!(e.weight_bytes, 4_000_020);
    assert_eq!(e.kv_bytes_per_token, 2 * 2 * 16 * 2 * 4);
}

#[test]
fn broken_files_and_names_without_files() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\xff").unwrap();
    assert!(estimate(&bad)
        .unwrap_err()
        .to_string()
        .contains("not a readable GGUF file"));
    std::fs::write(dir.path().join("notes.txt"), "hi").unwrap();
    assert!(estimate(&dir.path().join("notes.txt"))
        .unwrap_err()
        .to_string()
        .contains("not a GGUF file"));
    assert_eq!(estimate(Path::new("mlx-community/Qwen3-8B-4bit")).unwrap(), None);
    assert_eq!(model_path("demo"), None);
    assert_eq!(model_path("scripted:demo"), None);
    assert_eq!(model_path("mlx-community/Qwen3-8B-4bit"), None);
}

#[test]
fn the_check_refuses_what_would_reach_the_warning_threshold_and_says_the_numbers() {
    let gib = 1u64 << 30;
    let e = Estimate {
        source: "m.gguf".into(),
        weight_bytes: 4 * gib,
        kv_bytes_per_token: 1024,
    };
    assert!(check_fits("m", &e, 8, 4096, 10 * gib, 2 * gib).is_ok());
    let err = check_fits("m", &e, 8, 4096, 6 * gib, 2 * gib).unwrap_err().to_string();
    assert!(
        err.contains("about 4.03 GB") && err.contains("6.00 GB is available") && err.contains("(2.00 GB)"),
        "{err}"
    );
}
