//! The optimiser schedule every stage shares (judge, SFT, RFT): step count, batch, peak
//! learning rate, warm-up. Its own module so that the judge and SFT need not import each other.

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub warmup: usize,
    /// Weight of the auxiliary probe loss (0: off).
    pub aux: f64,
}

/// Linear warm-up, then cosine decay to 10%.
pub fn lr_at(step: usize, cfg: &TrainConfig) -> f64 {
    if step < cfg.warmup {
        return cfg.lr * (step + 1) as f64 / cfg.warmup as f64;
    }
    let t = (step - cfg.warmup) as f64 / (cfg.steps.saturating_sub(cfg.warmup)).max(1) as f64;
    cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        let cfg = TrainConfig { steps: 100, batch: 1, lr: 1.0, warmup: 10, aux: 0.0 };
        assert!((lr_at(0, &cfg) - 0.1).abs() < 1e-9);
        assert!((lr_at(10, &cfg) - 1.0).abs() < 1e-9);
        assert!((lr_at(100, &cfg) - 0.1).abs() < 1e-9);
        assert!(lr_at(50, &cfg) < 1.0 && lr_at(50, &cfg) > 0.1);
    }
}
