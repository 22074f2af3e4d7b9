//! Learning-rate and bias-update-speed schedules: pure functions of the step (or token) count.
//!
//! Invariant: a schedule is a value; `lr(step)` depends on nothing else, so a resumed run recomputes exactly the
//! learning rate the uninterrupted run used.

/// Linear warmup from 0 to `peak`, then cosine decay from `peak` to `floor` until `total_steps`, then `floor`.
///
/// Steps are 0-based: step `s < warmup_steps` uses `peak · (s + 1) / warmup_steps`, so the first step already
/// moves the weights and step `warmup_steps − 1` uses exactly `peak`. For `warmup_steps ≤ s < total_steps`,
/// `lr = floor + (peak − floor) · ½(1 + cos(π · (s − warmup) / (total − warmup)))`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LrSchedule {
    /// Learning rate at the end of warmup.
    pub peak: f32,
    /// Learning rate the cosine ends at (DeepSeek-V3 ends its cosine at a tenth of the peak).
    pub floor: f32,
    /// Number of warmup steps (0 disables warmup).
    pub warmup_steps: u64,
    /// Step at which the cosine reaches `floor`.
    pub total_steps: u64,
}

impl LrSchedule {
    /// The learning rate of step `step` (0-based).
    pub fn lr(&self, step: u64) -> f32 {
        if step < self.warmup_steps {
            return (f64::from(self.peak) * (step + 1) as f64 / self.warmup_steps as f64) as f32;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps);
        if span == 0 || step >= self.total_steps {
            return if step >= self.total_steps {
                self.floor
            } else {
                self.peak
            };
        }
        let progress = (step - self.warmup_steps) as f64 / span as f64;
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        (f64::from(self.floor) + (f64::from(self.peak) - f64::from(self.floor)) * cosine) as f32
    }
}

/// The routing-bias update speed γ: `rate` until `until_tokens` tokens have been trained on, then 0 (frozen).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BiasSpeedSchedule {
    /// γ while active (0.001 for DeepSeek-V3).
    pub rate: f32,
    /// Number of trained tokens after which γ becomes 0; `None` keeps γ = rate forever.
    pub until_tokens: Option<u64>,
}

impl BiasSpeedSchedule {
    /// γ for a step that starts after `tokens_seen` tokens (the rule every party shares:
    /// `routing::GammaSchedule`).
    pub fn gamma(&self, tokens_seen: u64) -> f32 {
        routing::GammaSchedule {
            rate: self.rate,
            until_tokens: self.until_tokens,
        }
        .gamma(tokens_seen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_floor() {
        let s = LrSchedule {
            peak: 1e-3,
            floor: 1e-4,
            warmup_steps: 4,
            total_steps: 14,
        };
        let lrs: Vec<f32> = (0..16).map(|i| s.lr(i)).collect();
        for (got, want) in lrs[..4].iter().zip([2.5e-4, 5e-4, 7.5e-4, 1e-3]) {
            assert!((got - want).abs() < 1e-10, "{lrs:?}");
        }
        assert_eq!(lrs[4], 1e-3);
        // Half-way through the cosine (step 9 of 4..14) the rate is the midpoint of peak and floor.
        assert!((lrs[9] - 5.5e-4).abs() < 1e-9, "{}", lrs[9]);
        // Step 6 is a fifth of the way: floor + (peak − floor)·½(1 + cos(π/5)) = 1e-4 + 9e-4 · 0.904508.
        assert!((lrs[6] - (1e-4 + 9e-4 * 0.904_508_5)).abs() < 1e-9);
        assert!(lrs[4..14].windows(2).all(|w| w[1] < w[0]));
        assert_eq!(lrs[14], 1e-4);
        assert_eq!(lrs[15], 1e-4);
        let flat = LrSchedule {
            peak: 0.5,
            floor: 0.1,
            warmup_steps: 0,
            total_steps: 0,
        };
        assert_eq!(flat.lr(0), 0.1);
    }

    #[test]
    fn bias_speed_freezes_after_the_token_budget() {
        let g = BiasSpeedSchedule {
            rate: 1e-3,
            until_tokens: Some(1000),
        };
        assert_eq!(g.gamma(0), 1e-3);
        assert_eq!(g.gamma(999), 1e-3);
        assert_eq!(g.gamma(1000), 0.0);
        assert_eq!(
            BiasSpeedSchedule {
                rate: 1e-3,
                until_tokens: None
            }
            .gamma(u64::MAX),
            1e-3
        );
    }
}
