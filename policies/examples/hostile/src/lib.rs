//! A policy that misbehaves as its settings say, for the tests: `{"mode": "loop_decide"}`,
//! `"loop_configure"`, `"memory_bomb"`, `"trap"`, `"print"` (writes to stdout and stderr),
//! `"refuse"` (configure returns an error), `"socket_configure"` / `"socket_decide"` (opens a
//! TCP connection: configure fails with the host's answer; decide rejects with it).

wit_bindgen::generate!({ path: "../../wit", world: "admission-policy" });


use pensieve::policy::types::Rejection;
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
            "socket_configure" => {
                connect()?;
            }
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
            "socket_decide" => match connect() {
                Ok(()) => Verdict::Admit,
                Err(e) => Verdict::Reject(Rejection {
                    status: 403,
                    error_type: "permission_error".into(),
                    message: e,
                    retry_after_secs: None,
                }),
            },
            "print" => {
                println!("hello from a policy's stdout");
                eprintln!("hello from a policy's stderr");
                Verdict::Admit
            }
            _ => Verdict::Admit,
        }
    }
}

/// Tries a TCP connection by name (a name lookup, then a connect): the host grants no
/// network, so this is its refusal.
fn connect() -> Result<(), String> {
    // Waiting on a host pollable too (a sleep), as a client waiting for its connection does.
    std::thread::sleep(std::time::Duration::from_millis(1));
    std::net::TcpStream::connect("localhost:9")
        .map(|_| ())
        .map_err(|e| format!("socket: {e}"))
}

fn unreachable_trap() -> Verdict {
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    #[cfg(not(target_arch = "wasm32"))]
    panic!("trap");
}

export!(Hostile);
