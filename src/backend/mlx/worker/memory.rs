//! The worker's memory lines: the KV cache a generation may grow to, checked before its prompt
//! is processed, and the memory limit MLX is given.

use std::sync::atomic::Ordering;

use super::{Batcher, Worker};
use crate::backend::BackendError;
use crate::memory::MemorySnapshot;

impl<B: Batcher> Worker<'_, B> {
    /// Whether a generation of `input_tokens` and up to `max_tokens` more (`asked` before the
    /// context capped it) has room for its KV cache, next to what the running generations have
    /// reserved: memory after it must stay above the critical threshold, and MLX under
    /// `backend.mlx_memory_limit_mb` when one is set.
    pub(super) fn room_for(&self, input_tokens: u32, asked: u32, max_tokens: u32) -> Result<(), BackendError> {
        let per_token = self.shared.kv_bytes_per_token.load(Ordering::Relaxed);
        let snapshot = self.gate.snapshot().load();
        if per_token == 0 || snapshot.available_bytes == 0 {
            return Ok(());
        }
        let need = (input_tokens as u64 + max_tokens as u64).saturating_mul(per_token);
        let reserved = self.reserved_bytes() + self.elsewhere;
        let critical = self.gate.thresholds().critical;
        let configured = self.shared.global.mlx_limit_configured.load(Ordering::Relaxed);
        let active = self.shared.global.active_bytes.load(Ordering::Relaxed);
        let machine_ok = snapshot.available_bytes.saturating_sub(reserved + need) > critical;
        let mlx_ok = configured == 0 || active + reserved + need <= configured;
        if machine_ok && mlx_ok {
            return Ok(());
        }
        let gb = |b: u64| b as f64 / crate::memory::GIB;
        let (room, fits_later) = if !machine_ok {
            let room = format!(
                "{:.2} GB is available, with memory.critical_gb at {:.2} GB",
                snapshot.available_gb(),
                gb(critical)
            );
            (room, snapshot.total_bytes.saturating_sub(need) > critical)
        } else {
            let room = format!(
                "MLX holds {:.2} GB of its limit of {:.2} GB (backend.mlx_memory_limit_mb)",
                gb(active),
                gb(configured)
            );
            (room, need <= configured.saturating_sub(active))
        };
        let capped = if max_tokens < asked {
            format!(" (the context leaves {max_tokens})")
        } else {
            String::new()
        };
        let running = if reserved > 0 {
            format!(
                "; the running generations have {:.2} GB reserved for theirs",
                gb(reserved)
            )
        } else {
            String::new()
        };
        let message = format!(
            "this request needs about {:.2} GB of KV cache ({input_tokens} prompt tokens + max_tokens {asked}{capped}, \
             {per_token} bytes a token){running}, and {room}: lower max_tokens{}",
            gb(need),
            if fits_later { " or retry when memory is free" } else { " (it cannot fit on this machine)" },
        );
        tracing::warn!(need_gb = gb(need), reserved_gb = gb(reserved), "{message}");
        Err(BackendError::TooLarge {
            message,
            fits_later,
            retry_after_secs: self.gate.retry_after_secs(),
        })
    }

    /// Gives MLX its memory limit: `backend.mlx_memory_limit_mb` when set, and never more than
    /// what MLX holds now plus what memory has above `memory.emergency_gb`. Sent again only
    /// when it moves by more than a sixteenth.
    pub(super) fn update_mlx_limit(&mut self, snapshot: &MemorySnapshot) {
        if snapshot.available_bytes == 0 {
            return;
        }
        let held = snapshot
            .backend_active_bytes
            .unwrap_or_else(|| self.shared.global.active_bytes.load(Ordering::Relaxed));
        let mut limit = held
            + snapshot
                .available_bytes
                .saturating_sub(self.gate.thresholds().emergency);
        let configured = self.shared.global.mlx_limit_configured.load(Ordering::Relaxed);
        if configured > 0 {
            limit = limit.min(configured);
        }
        let limit = limit.max(1);
        if self.mlx_limit != 0 && self.mlx_limit.abs_diff(limit) <= self.mlx_limit / 16 {
            return;
        }
        match self.batcher.set_memory_limit(limit) {
            Ok(()) => {
                tracing::debug!(limit, "MLX memory limit set");
                self.mlx_limit = limit;
                self.shared.global.mlx_limit.store(limit, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(error = %e, "could not set MLX's memory limit"),
        }
    }
}
