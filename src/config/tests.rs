#![allow(clippy::result_large_err)] // figment::Jail's closures return figment's own large error

use super::*;
use figment::Jail;

#[test]
fn defaults_are_the_documented_ones() {
    Jail::expect_with(|_| {
        let c = Config::load(None, &Flags::default()).unwrap();
        assert_eq!((c.server.host.as_str(), c.server.port), ("127.0.0.1", 7777));
        assert_eq!(
            (c.memory.warning_gb, c.memory.critical_gb, c.memory.emergency_gb),
            (2.0, 1.0, 0.5)
        );
        assert_eq!(c.memory.sample_interval_ms, 250);
        assert_eq!(c.backend.model, "demo");
        Ok(())
    });
}

#[test]
fn file_then_env_then_flags_override_in_order() {
    Jail::expect_with(|jail| {
        jail.create_dir("config")?;
        jail.create_file(
            "config/pensieve.toml",
            "[memory]\ncritical_gb = 1.5\n[server]\nport = 8000\n",
        )?;
        jail.set_env("PENSIEVE_CONFIG", "config/pensieve.toml");
        jail.set_env("PENSIEVE_SERVER__PORT", "9000");
        jail.set_env("PENSIEVE_UNRELATED", "ignored");
        let c = Config::load(None, &Flags::default()).unwrap();
        assert_eq!(c.memory.critical_gb, 1.5);
        assert_eq!(c.server.port, 9000);
        let flags = Flags {
            server: FlagServer {
                port: Some(9100),
                host: None,
            },
            ..Default::default()
        };
        assert_eq!(Config::load(None, &flags).unwrap().server.port, 9100);
        let text = Config::explain(None, &flags).unwrap();
        assert!(text.contains("memory.critical_gb = 1.5  # file"), "{text}");
        assert!(text.contains("server.port = 9100  # command-line flag"), "{text}");
        assert!(text.contains("memory.warning_gb = 2.0  # default"), "{text}");
        Ok(())
    });
}

#[test]
fn env_source_is_named_in_explain() {
    Jail::expect_with(|jail| {
        jail.set_env("PENSIEVE_MEMORY__WARNING_GB", "4");
        let text = Config::explain(None, &Flags::default()).unwrap();
        assert!(
            text.contains("memory.warning_gb = 4.0  # environment PENSIEVE_MEMORY__WARNING_GB"),
            "{text}"
        );
        Ok(())
    });
}

#[test]
fn thresholds_out_of_order_name_the_key_and_the_file() {
    Jail::expect_with(|jail| {
        jail.create_file("my.toml", "[memory]\nwarning_gb = 1.0\ncritical_gb = 1.0\n")?;
        let err = Config::load(Some(Path::new("my.toml")), &Flags::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("memory.warning_gb"), "{err}");
        assert!(err.contains("my.toml"), "{err}");
        Ok(())
    });
}

#[test]
fn negative_emergency_is_refused() {
    Jail::expect_with(|jail| {
        jail.set_env("PENSIEVE_MEMORY__EMERGENCY_GB", "-1");
        let err = Config::load(None, &Flags::default()).unwrap_err().to_string();
        assert!(
            err.contains("memory.emergency_gb") && err.contains("environment"),
            "{err}"
        );
        Ok(())
    });
}

#[test]
fn unknown_key_and_wrong_type_name_the_key_and_the_file() {
    Jail::expect_with(|jail| {
        jail.create_file("a.toml", "[memory]\nwarnig_gb = 3\n")?;
        let err = Config::load(Some(Path::new("a.toml")), &Flags::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("warnig_gb") && err.contains("a.toml"), "{err}");
        jail.create_file("b.toml", "[server]\nport = \"many\"\n")?;
        let err = Config::load(Some(Path::new("b.toml")), &Flags::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.port") && err.contains("b.toml"), "{err}");
        Ok(())
    });
}

#[test]
fn broken_toml_names_the_file() {
    Jail::expect_with(|jail| {
        jail.create_file("c.toml", "[memory\n")?;
        let err = Config::load(Some(Path::new("c.toml")), &Flags::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("c.toml"), "{err}");
        Ok(())
    });
}

#[test]
fn missing_config_file_is_an_error() {
    Jail::expect_with(|_| {
        let err = Config::load(Some(Path::new("nope.toml")), &Flags::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope.toml"), "{err}");
        Ok(())
    });
}

#[test]
fn layers_are_all_on_by_default_and_switched_from_file_and_env() {
    Jail::expect_with(|jail| {
        let c = Config::load(None, &Flags::default()).unwrap();
        assert_eq!(c.layers, LayersConfig::default());
        assert!(
            c.layers.logging && c.layers.memory_headers && c.layers.auth && c.layers.admission && c.layers.policies
        );
        jail.create_file(LAYERS_FILE, "[layers]\nauth = false\n")?;
        jail.set_env("PENSIEVE_LAYERS__POLICIES", "false");
        let file = Path::new(LAYERS_FILE);
        let c = Config::load(Some(file), &Flags::default()).unwrap();
        assert!(!c.layers.auth && !c.layers.policies && c.layers.admission);
        let explained = Config::explain(Some(file), &Flags::default()).unwrap();
        assert!(explained.contains("layers.auth = false  # file"), "{explained}");
        assert!(
            explained.contains("layers.policies = false  # environment PENSIEVE_LAYERS__POLICIES"),
            "{explained}"
        );
        jail.create_file(LAYERS_FILE, "[layers]\nmetrics = false\n")?;
        let err = Config::load(Some(file), &Flags::default()).unwrap_err().to_string();
        assert!(err.contains("metrics") && err.contains(LAYERS_FILE), "{err}");
        Ok(())
    });
}

const LAYERS_FILE: &str = "layers.toml";

#[test]
fn models_tables_give_specs_and_bad_entries_name_their_key() {
    Jail::expect_with(|jail| {
        jail.create_file("small.gguf", "GGUF")?;
        let good = r#"
[server]
default_model = "big"
fallback = "404"
[models.big]
path = "mlx-community/Qwen3-8B-4bit"
aliases = ["claude-sonnet-*"]
[models.small]
path = "small.gguf"
aliases = ["claude-haiku-*"]
keep_alive_secs = 300
max_concurrent = 2
prompt_cache_disk_mb = 100
draft = "big"
"#;
        jail.create_file("m.toml", good)?;
        jail.set_env("PENSIEVE_BACKEND__PROMPT_CACHE_DIR", "/var/cache/pensieve");
        let c = Config::load(Some(Path::new("m.toml")), &Flags::default()).unwrap();
        assert_eq!(c.server.fallback, Fallback::NotFound);
        let specs = c.model_specs();
        assert_eq!(specs.len(), 2);
        let (big, small) = (&specs[0], &specs[1]);
        assert!(big.preload, "the default model is loaded at start-up");
        assert!(!small.preload && small.keep_alive_secs == 300 && small.max_concurrent == 2);
        assert_eq!(big.max_concurrent, 8, "backend.max_concurrent by default");
        // A draft names another model; the spec carries its path.
        assert_eq!(
            small.draft,
            Some(("big".to_owned(), "mlx-community/Qwen3-8B-4bit".to_owned()))
        );
        assert_eq!(big.draft, None);
        // The disk tier: one folder for all (from the environment here), a cap per model.
        assert_eq!(
            (big.prompt_cache_disk_bytes, small.prompt_cache_disk_bytes),
            (8192 << 20, 100 << 20)
        );
        assert!(specs.iter().all(|s| s.prompt_cache_dir == "/var/cache/pensieve"));
        let text = Config::explain(Some(Path::new("m.toml")), &Flags::default()).unwrap();
        assert!(text.contains("models.small.keep_alive_secs = 300  # file"), "{text}");
        assert!(
            text.contains("models.small.prompt_cache_disk_mb = 100  # file"),
            "{text}"
        );
        assert!(
            text.contains("backend.prompt_cache_disk_mb = 8192  # default"),
            "{text}"
        );
        // `--model` is the one-model shortcut: the table is set aside.
        let flags = Flags {
            backend: FlagBackend {
                model: Some("demo".into()),
                force_load: None,
            },
            ..Default::default()
        };
        let one = Config::load(Some(Path::new("m.toml")), &flags).unwrap().model_specs();
        assert_eq!((one.len(), one[0].name.as_str(), one[0].preload), (1, "demo", true));
        // A GGUF file is served under its stem (and still answers to its path).
        let flags = Flags {
            backend: FlagBackend {
                model: Some("/models/SmolLM2-135M-Instruct.Q4_1.gguf".into()),
                force_load: None,
            },
            ..Default::default()
        };
        let config = Config::load(Some(Path::new("m.toml")), &flags).unwrap();
        let one = config.model_specs();
        assert_eq!(one[0].name, "SmolLM2-135M-Instruct.Q4_1");
        assert_eq!(one[0].aliases, ["/models/SmolLM2-135M-Instruct.Q4_1.gguf"]);
        assert_eq!(config.default_model(), "SmolLM2-135M-Instruct.Q4_1");
        for (given, short) in [
            ("./models/qwen/", "qwen"),
            ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B"),
            ("a.gguf", "a"),
        ] {
            assert_eq!(super::models::short_name(given), short);
        }

        for (bad, key, says) in [
            (
                "\n[models.tiny]\npath = \"./missing.gguf\"\n",
                "models.tiny.path",
                "does not exist",
            ),
            (
                "\n[models.tiny]\npath = \"demo\"\naliases = [\"claude-haiku-*\"]\n",
                "models.tiny.aliases",
                "claimed by model `small`",
            ),
            (
                "\n[models.tiny]\npath = \"demo\"\naliases = [\"big\"]\n",
                "models.tiny.aliases",
                "is the name of model `big`",
            ),
            (
                "\n[models.tiny]\naliases = [\"t\"]\n",
                "models.tiny.path",
                "must be set",
            ),
            (
                "\n[models.tiny]\npath = \"demo\"\nmax_concurrent = 0\n",
                "models.tiny.max_concurrent",
                "between 1 and 256",
            ),
            (
                "\n[models.tiny]\npath = \"demo\"\ndraft = \"nano\"\n",
                "models.tiny.draft",
                "names `nano`, which is not a model in [models]",
            ),
            (
                "\n[models.tiny]\npath = \"demo\"\ndraft = \"tiny\"\n",
                "models.tiny.draft",
                "cannot draft for itself",
            ),
        ] {
            jail.create_file("bad.toml", &format!("{good}{bad}"))?;
            let e = Config::load(Some(Path::new("bad.toml")), &Flags::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("`{key}`")) && e.contains(says), "{bad}: {e}");
        }
        jail.create_file(
            "bad.toml",
            &good.replace("default_model = \"big\"", "default_model = \"huge\""),
        )?;
        let e = Config::load(Some(Path::new("bad.toml")), &Flags::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("`server.default_model`") && e.contains("`huge`"), "{e}");
        jail.create_file("bad.toml", &good.replace("default_model = \"big\"\n", ""))?;
        let e = Config::load(Some(Path::new("bad.toml")), &Flags::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("`server.default_model`") && e.contains("several"), "{e}");
        jail.create_file("bad.toml", &good.replace("\"404\"", "\"nope\""))?;
        let e = Config::load(Some(Path::new("bad.toml")), &Flags::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("fallback"), "{e}");
        Ok(())
    });
}

#[test]
fn the_file_read_is_the_flag_then_pensieve_config_then_the_users_folder() {
    Jail::expect_with(|jail| {
        let home = jail.directory().to_owned();
        jail.set_env("HOME", home.display());
        jail.set_env("XDG_CONFIG_HOME", "");
        jail.set_env("PENSIEVE_CONFIG", "");
        // Nothing anywhere: defaults, and `config` says so.
        assert_eq!(config_file(None).path, None);
        let text = Config::explain(None, &Flags::default()).unwrap();
        assert!(
            text.contains("resolved.config_file = \"\"  # none found: defaults"),
            "{text}"
        );
        // The user's folder.
        jail.create_dir(".config/pensieve")?;
        jail.create_file(".config/pensieve/pensieve.toml", "[server]\nport = 8001\n")?;
        assert_eq!(Config::load(None, &Flags::default()).unwrap().server.port, 8001);
        let text = Config::explain(None, &Flags::default()).unwrap();
        assert!(
            text.contains(".config/pensieve/pensieve.toml\"  # the user's configuration folder"),
            "{text}"
        );
        // XDG_CONFIG_HOME moves that folder.
        jail.create_dir("xdg/pensieve")?;
        jail.create_file("xdg/pensieve/pensieve.toml", "[server]\nport = 8002\n")?;
        jail.set_env("XDG_CONFIG_HOME", home.join("xdg").display());
        assert_eq!(Config::load(None, &Flags::default()).unwrap().server.port, 8002);
        // PENSIEVE_CONFIG above it; a file it names must exist.
        jail.create_file("env.toml", "[server]\nport = 8003\n")?;
        jail.set_env("PENSIEVE_CONFIG", "env.toml");
        assert_eq!(Config::load(None, &Flags::default()).unwrap().server.port, 8003);
        // --config above everything.
        jail.create_file("flag.toml", "[server]\nport = 8004\n")?;
        let flag = Some(Path::new("flag.toml"));
        assert_eq!(Config::load(flag, &Flags::default()).unwrap().server.port, 8004);
        assert!(Config::explain(flag, &Flags::default())
            .unwrap()
            .contains("flag.toml\"  # --config"));
        jail.set_env("PENSIEVE_CONFIG", "missing.toml");
        let err = Config::load(None, &Flags::default()).unwrap_err().to_string();
        assert!(err.contains("missing.toml"), "{err}");
        // A file in the working directory's config/ is not read (it was before the wheel).
        jail.set_env("PENSIEVE_CONFIG", "");
        jail.set_env("XDG_CONFIG_HOME", home.join("nothing").display());
        jail.set_env("HOME", home.join("nothing").display());
        jail.create_dir("config")?;
        jail.create_file("config/pensieve.toml", "[server]\nport = 8005\n")?;
        assert_eq!(Config::load(None, &Flags::default()).unwrap().server.port, 7777);
        Ok(())
    });
}
