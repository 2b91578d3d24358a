//! A policy that misbehaves as its settings say, for the tests: `{"mode": "loop_decide"}`,
//! `"loop_configure"`, `"memory_bomb"`, `"trap"`, `"print"` (writes to stdout and stderr), or
//! `"refuse"` (configure returns an error).

wit_bindgen::generate!({ path: "../../wit", world: "admission-policy" });


use std::sync::Mutex;

static MODE: Mutex<String> = Mutex::new(String::new());

struct Hostile;

fn mode() -> String {
    MODE.lock().unwrap().clone()
}

impl Guest for Hostile {
    fn configure(settings: String) -> Result<(), String> {
        let mode = settings.split('"').skip_while(|s| *s != "mode").nth(2).unwrap_or("").to_owned();
        match mode.as_str() {
            "loop_configure" => loop {
                std::hint::black_box(());
            },
            "refuse" => return Err("this policy refuses to run".into()),
            _ => {}
        }
        *MODE.lock().unwrap() = mode;
        Ok(())
    }

    fn classify(_mem: Memory) -> Option<Tier> {
        None
    }

    fn decide(_req: Request, _mem: Memory) -> Verdict {
        match mode().as_str() {
            "loop_decide" => loop {
                std::hint::black_box(());
            },
            "memory_bomb" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "trap" => unreachable_trap(),
            "print" => {
                println!("hello from a policy's stdout");
                eprintln!("hello from a policy's stderr");
                Verdict::Admit
            }
            _ => Verdict::Admit,
        }
    }
}

fn unreachable_trap() -> Verdict {
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    #[cfg(not(target_arch = "wasm32"))]
    panic!("trap");
}

export!(Hostile);
