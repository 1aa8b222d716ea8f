"""BG/NBD (Fader, Hardie & Lee 2005) purchase model with the Gamma-Gamma spend model.

Both are fitted by maximum likelihood in log space with numpy/scipy. Identical summaries are
aggregated and weighted first, so a million customers collapse to a few tens of thousands of
distinct ``(x, t_x, T)`` rows and fit in seconds. Time is in days (``alpha`` is in days;
divide by 7 to compare with the literature's weekly figures).

Inputs are the contract's features: ``x = frequency`` (repeat purchase days),
``t_x = recency_days``, ``T = age_days``, ``m = avg_repeat_value`` (mean revenue of the
repeat purchase days).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Self

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.special import betaincinv, betaln, digamma, gammaln, hyp2f1, roots_legendre

from clv.errors import ModelError
from training.models.base import CLVModel, TrainingSet, numeric_features, prediction_frame


def _aggregate(*cols: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Distinct rows of the given columns and their multiplicities."""
    stacked = np.column_stack(cols)
    uniq, counts = np.unique(stacked, axis=0, return_counts=True)
    return [uniq[:, i] for i in range(uniq.shape[1])], counts.astype(np.float64)


@dataclass(frozen=True)
class BGNBDParams:
    r: float
    alpha: float
    a: float
    b: float


def bgnbd_loglik(params: BGNBDParams, x: np.ndarray, t_x: np.ndarray, T: np.ndarray) -> np.ndarray:
    """Per-customer BG/NBD log-likelihood."""
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    head = gammaln(r + x) - gammaln(r) + r * np.log(alpha)
    t1 = betaln(a, b + x) - betaln(a, b) - (r + x) * np.log(alpha + T)
    has = x > 0
    xs = np.where(has, x, 1.0)
    t2 = betaln(a + 1, b + xs - 1) - betaln(a, b) - (r + xs) * np.log(alpha + t_x)
    return head + np.where(has, np.logaddexp(t1, t2), t1)


class _Summaries:
    """Distinct ``(x, t_x, T)`` rows with weights, plus the distinct values of each column, so
    a likelihood evaluation computes special functions once per distinct value, not per row."""

    def __init__(self, x: np.ndarray, t_x: np.ndarray, T: np.ndarray, w: np.ndarray) -> None:
        self.w = w / w.sum()
        self.x, self.t_x, self.T = x, t_x, T
        self.ux, self.ix = np.unique(x, return_inverse=True)
        self.uT, self.iT = np.unique(T, return_inverse=True)
        self.utx, self.itx = np.unique(t_x, return_inverse=True)
        self.has = x > 0


def _bgnbd_nll_grad(theta: np.ndarray, d: _Summaries) -> tuple[float, np.ndarray]:
    """Mean negative log-likelihood and its gradient in ``log(r, alpha, a, b)``."""
    r, al, a, b = np.exp(theta)
    ux, ix = d.ux, d.ix
    uxs = np.maximum(ux, 1.0)
    head = gammaln(r + ux) - gammaln(r) + r * np.log(al)
    c1 = betaln(a, b + ux) - betaln(a, b)
    c2 = betaln(a + 1, b + uxs - 1) - betaln(a, b)
    lT, ltx = np.log(al + d.uT)[d.iT], np.log(al + d.utx)[d.itx]
    rx = r + d.x
    u1 = c1[ix] - rx * lT
    u2 = np.where(d.has, c2[ix] - rx * ltx, -np.inf)
    total = np.logaddexp(u1, u2)
    ll = head[ix] + total
    p1 = np.exp(u1 - total)
    p2 = np.exp(u2 - total)
    psi_ab, psi_abx = digamma(a + b), digamma(a + b + ux)
    d_r = (digamma(r + ux) - digamma(r) + np.log(al))[ix] - p1 * lT - p2 * ltx
    d_al = r / al - rx * (p1 / (al + d.uT)[d.iT] + p2 / (al + d.utx)[d.itx])
    d_a = p1 * (psi_ab - psi_abx)[ix] + p2 * (digamma(a + 1) - digamma(a) + psi_ab - psi_abx)[ix]
    d_b = (
        p1 * (digamma(b + ux) - digamma(b) + psi_ab - psi_abx)[ix]
        + p2 * (digamma(b + uxs - 1) - digamma(b) + psi_ab - psi_abx)[ix]
    )
    w = d.w
    value = -float(np.dot(w, ll))
    grad = -np.array(
        [np.dot(w, d_r) * r, np.dot(w, d_al) * al, np.dot(w, d_a) * a, np.dot(w, d_b) * b]
    )
    if not (np.isfinite(value) and np.all(np.isfinite(grad))):
        return 1e10, np.zeros(4)
    return value, grad


#: Upper bounds of the dropout prior's ``a`` and ``b``. Fits that run off to large ``a`` and
#: ``b`` sit on a flat ridge of the likelihood (every customer has nearly the same dropout
#: probability a / (a + b)), so the bound costs no likelihood to speak of; it keeps the fit where
#: scipy's ``hyp2f1`` in :func:`bgnbd_expected` mostly works (it returns NaN for every customer
#: past about a = 1,000). Within the bounds it can still overflow on long horizons, which the
#: quadrature fallback covers.
MAX_A, MAX_B = 300.0, 1e5


def fit_bgnbd(
    x: np.ndarray, t_x: np.ndarray, T: np.ndarray, weights: np.ndarray | None = None
) -> tuple[BGNBDParams, float]:
    """Maximum-likelihood BG/NBD parameters and the total log-likelihood.

    L-BFGS on the log parameters with the analytic gradient, from two starting points; times
    are rescaled to the mean age so the parameters are of order one; ``a`` and ``b`` stay
    within :data:`MAX_A` and :data:`MAX_B`.
    """
    x, t_x, T = (np.asarray(v, dtype=np.float64) for v in (x, t_x, T))
    if weights is None:
        (x, t_x, T), w = _aggregate(x, t_x, T)
    else:
        w = np.asarray(weights, dtype=np.float64)
    if len(x) == 0 or w.sum() == 0:
        raise ModelError("BG/NBD needs at least one customer")
    scale = max(float(np.average(T, weights=w)), 1.0)  # fit in units of the mean age
    data = _Summaries(x, t_x / scale, T / scale, w)
    best = None
    for start in (np.zeros(4), np.log([0.5, 0.5, 1.0, 3.0])):
        res = minimize(
            _bgnbd_nll_grad,
            start,
            args=(data,),
            jac=True,
            method="L-BFGS-B",
            bounds=[(-15, 15), (-15, 15), (-15, np.log(MAX_A)), (-15, np.log(MAX_B))],
            options={"ftol": 1e-14, "gtol": 1e-9, "maxiter": 2000},
        )
        if best is None or res.fun < best.fun:
            best = res
    assert best is not None
    r, alpha, a, b = np.exp(best.x)
    params = BGNBDParams(float(r), float(alpha * scale), float(a), float(b))
    total = float(np.dot(w, bgnbd_loglik(params, x, t_x, T)))
    return params, total


def bgnbd_p_alive(p: BGNBDParams, x: np.ndarray, t_x: np.ndarray, T: np.ndarray) -> np.ndarray:
    """P(still active at T | x, t_x, T)."""
    xs = np.maximum(x, 1.0)
    log_ratio = (
        np.log(p.a)
        - np.log(p.b + xs - 1)
        + (p.r + xs) * (np.log(p.alpha + T) - np.log(p.alpha + t_x))
    )
    odds = np.where(x > 0, np.exp(np.minimum(log_ratio, 700.0)), 0.0)
    return 1.0 / (1.0 + odds)


def bgnbd_expected(
    p: BGNBDParams, t: float, x: np.ndarray, t_x: np.ndarray, T: np.ndarray
) -> np.ndarray:
    """Expected purchases (repeat purchase days) in ``(T, T + t]`` given ``(x, t_x, T)``.

    The closed form uses Euler's transformation, ``(1-z)^(r+x) 2F1(r+x, b+x; a+b+x-1; z) =
    (1-z)^(a-1) 2F1(a+b-1-r, a-1; a+b+x-1; z)``, which keeps the hypergeometric function's
    parameters small for heavy buyers (the textbook form overflows). Where it still fails (large
    ``a`` with a long horizon, where scipy's ``hyp2f1`` overflows) or leaves the range a
    forecast can have, the same expectation comes from quadrature
    (:func:`_alive_expectation_quadrature`).
    """
    x, t_x, T = (np.asarray(v, dtype=np.float64) for v in (x, t_x, T))
    if t <= 0:
        return np.zeros_like(x)
    r, alpha, a, b = p.r, p.alpha, p.a, p.b
    if abs(a - 1) < 1e-9:  # limit a -> 1 of (1 - tail)/(a - 1) is finite; nudge instead
        return bgnbd_expected(BGNBDParams(r, alpha, a + 1e-6, b), t, x, t_x, T)
    z = t / (alpha + T + t)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        tail = np.exp((a - 1) * np.log1p(-z)) * hyp2f1(a + b - 1 - r, a - 1, a + b + x - 1, z)
        alive_expected = (a + b + x - 1) / (a - 1) * (1.0 - tail)
    # E[purchases | alive] lies between 0 and the no-dropout figure (r + x) t / (alpha + T)
    cap = (r + x) * t / (alpha + T)
    bad = ~(np.isfinite(alive_expected) & (alive_expected >= 0) & (alive_expected <= cap * 1.0001))
    if bad.any():
        alive_expected = alive_expected.copy()
        alive_expected[bad] = _alive_expectation_quadrature(p, t, x[bad], T[bad])
    return alive_expected * bgnbd_p_alive(p, x, t_x, T)


#: Gauss-Legendre nodes over the dropout probability's quantiles (relative error ~1e-5).
_QUAD_NODES = 64
_QUAD_CHUNK = 65_536


def _alive_expectation_quadrature(
    p: BGNBDParams, t: float, x: np.ndarray, T: np.ndarray
) -> np.ndarray:
    """``E[purchases in (T, T+t] | alive]`` as an integral over the dropout probability.

    Given alive, the purchase rate is Gamma(r + x, alpha + T) and the dropout probability
    ``q`` is Beta(a, b + x), independently; with the rate integrated out,
    ``E = E_q[(1 - (1 + q t / (alpha + T))^-(r + x)) / q]``, a bounded, smooth integrand
    evaluated at Gauss-Legendre nodes of ``q``'s quantile (``betaincinv``), so no
    hypergeometric function is needed.
    """
    v, w = roots_legendre(_QUAD_NODES)
    v, w = (v + 1) / 2, w / 2
    ux, ix = np.unique(x, return_inverse=True)
    nodes = betaincinv(p.a, p.b + ux[:, None], v[None, :])  # per distinct x
    out = np.empty(len(x))
    for lo in range(0, len(x), _QUAD_CHUNK):  # bounded memory: chunk x nodes at a time
        hi = min(lo + _QUAD_CHUNK, len(x))
        q = nodes[ix[lo:hi]]
        s = (t / (p.alpha + T[lo:hi]))[:, None]
        k = (p.r + x[lo:hi])[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            g = np.where(q > 0, -np.expm1(-k * np.log1p(q * s)) / q, k * s)
        out[lo:hi] = g @ w
    return out


@dataclass(frozen=True)
class GammaGammaParams:
    p: float
    q: float
    gamma: float

    @property
    def population_mean(self) -> float:
        """E[spend per transaction] of a customer with no history (needs q > 1)."""
        return self.p * self.gamma / (self.q - 1) if self.q > 1 else float("nan")


def gg_loglik(params: GammaGammaParams, x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Per-customer Gamma-Gamma log-likelihood of the mean spend ``m`` over ``x`` purchases."""
    p, q, g = params.p, params.q, params.gamma
    px = p * x
    return (
        gammaln(px + q)
        - gammaln(px)
        - gammaln(q)
        + q * np.log(g)
        + (px - 1) * np.log(m)
        + px * np.log(x)
        - (px + q) * np.log(g + m * x)
    )


def fit_gamma_gamma(
    x: np.ndarray, m: np.ndarray, weights: np.ndarray | None = None
) -> GammaGammaParams:
    """Maximum-likelihood Gamma-Gamma parameters on repeat buyers (``x > 0``, ``m > 0``)."""
    x, m = np.asarray(x, dtype=np.float64), np.asarray(m, dtype=np.float64)
    keep = (x > 0) & (m > 0)
    if weights is None:
        (x, m), w = _aggregate(x[keep], m[keep])
    else:
        x, m, w = x[keep], m[keep], np.asarray(weights, dtype=np.float64)[keep]
    if w.sum() < 2:
        raise ModelError("Gamma-Gamma needs repeat buyers with positive spend")
    scale = float(np.average(m, weights=w))

    def nll(theta: np.ndarray) -> float:
        p, q, g = np.exp(theta)
        val = -float(np.dot(w, gg_loglik(GammaGammaParams(p, q, g), x, m / scale))) / w.sum()
        return val if np.isfinite(val) else 1e10

    res = minimize(nll, np.log([2.0, 3.0, 1.0]), method="L-BFGS-B", bounds=[(-10, 10)] * 3)
    res = minimize(
        nll, res.x, method="Nelder-Mead", options={"xatol": 1e-9, "fatol": 1e-12, "maxiter": 4000}
    )
    p, q, g = np.exp(res.x)
    return GammaGammaParams(float(p), float(q), float(g * scale))


def gg_expected_spend(
    params: GammaGammaParams, x: np.ndarray, m: np.ndarray, fallback: float = float("nan")
) -> np.ndarray:
    """E[spend per purchase day | x, m]; the population mean for customers without repeats.

    The posterior mean ``p (gamma + m x) / (p x + q - 1)`` weighs the customer's average ``m``
    against the population mean ``p gamma / (q - 1)`` with weight ``q - 1``. Where the fit has
    ``q <= 1`` (spend across customers heavier-tailed than a gamma mix allows) that mean is
    infinite and the weight vanishes or turns negative, so the formula would blow up as
    ``p x + q - 1`` nears 0: a repeat buyer gets its limit at ``q = 1``, ``m + gamma / x``
    (bounded, continuous as the fit crosses 1), and a customer without repeats ``fallback``
    (the fit's repeat buyers' average spend, :attr:`BGNBDGammaGamma.spend_fallback_`). A
    parameter that is no finite number gives NaN, refused downstream, never zeroed."""
    p, q, g = params.p, params.q, params.gamma
    x = np.asarray(x, dtype=np.float64)
    m = np.maximum(np.asarray(m, dtype=np.float64), 0.0)
    finite = bool(np.isfinite([p, q, g]).all())
    q_eff = max(q, 1.0) if finite else float("nan")
    denom = p * x + q_eff - 1  # > 0 for every repeat buyer of a finite fit (p > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cond = np.where(denom > 0, p * (g + m * x) / denom, np.nan)
    population = params.population_mean if q > 1 or not finite else fallback
    return np.where(x > 0, cond, population)


def btyd_inputs(features: pd.DataFrame) -> tuple[np.ndarray, ...]:
    """``(x, t_x, T, m)`` from the contract's features."""
    f = numeric_features(features)
    x = f["frequency"].to_numpy()
    T = np.maximum(f["age_days"].to_numpy(), 0.0)
    t_x = np.clip(f["recency_days"].to_numpy(), 0.0, T)
    return x, t_x, T, f["avg_repeat_value"].to_numpy()


def current_bgnbd_fit(ds: TrainingSet) -> tuple[BGNBDParams, float]:
    """BG/NBD fitted on ``ds.current`` (every customer as of the set's end) and its
    log-likelihood, computed once per training set and shared by every model that needs it:
    the reference, the hybrids' current model and the regressors' P(alive). Raises what the
    fit raised, each time it is asked."""
    if "current_bgnbd" not in ds.memo:
        try:
            ds.memo["current_bgnbd"] = fit_bgnbd(*btyd_inputs(ds.current)[:3])
        except (ModelError, ValueError, ArithmeticError) as exc:
            ds.memo["current_bgnbd"] = exc
    fitted = ds.memo["current_bgnbd"]
    if isinstance(fitted, Exception):
        raise fitted
    return fitted


def current_bgnbd(ds: TrainingSet) -> BGNBDParams | None:
    """:func:`current_bgnbd_fit`'s parameters, or None where BG/NBD cannot be fitted: the
    models without a dropout process of their own take P(alive) from it when they can."""
    try:
        return current_bgnbd_fit(ds)[0]
    except (ModelError, ValueError, ArithmeticError):
        return None


def p_alive_from(params: BGNBDParams | None, features: pd.DataFrame) -> np.ndarray | None:
    """BG/NBD's P(alive) of each customer as of the features' day, or None without a fit."""
    if params is None:
        return None
    x, t_x, T, _ = btyd_inputs(features)
    alive = bgnbd_p_alive(params, x, t_x, T)
    return alive if np.isfinite(alive).all() else None


class BGNBDGammaGamma(CLVModel):
    """BG/NBD purchase counts times Gamma-Gamma spend, fitted on the latest snapshot.

    ``predicted_value = E[purchases in H] * E[spend per purchase]``. The model needs no labels:
    it is fitted on ``ds.current`` (every user's features as of the training set's end).
    """

    name = "bgnbd_gg"

    def __init__(self, min_customers: int = 10) -> None:
        self.min_customers = min_customers

    def fit(self, ds: TrainingSet) -> Self:
        """Fit on ``ds.current``, with the training set's shared BG/NBD fit."""
        return self.fit_features(ds.current, bgnbd=current_bgnbd_fit(ds))

    def fit_features(
        self, features: pd.DataFrame, bgnbd: tuple[BGNBDParams, float] | None = None
    ) -> Self:
        """Fit on one snapshot of features (the calibration period ending at its as-of day);
        ``bgnbd``: BG/NBD's fit of these features (parameters, log-likelihood) when known."""
        if len(features) < self.min_customers:
            raise ModelError(f"BG/NBD needs at least {self.min_customers} customers")
        x, t_x, T, m = btyd_inputs(features)
        self.bgnbd_, self.loglik_ = bgnbd if bgnbd is not None else fit_bgnbd(x, t_x, T)
        self.gg_ = fit_gamma_gamma(x, m)
        repeat = m[(x > 0) & (m > 0)]
        self.spend_fallback_ = float(repeat.mean()) if len(repeat) else float("nan")
        if not self.gg_.q > 1:
            warnings.warn(
                f"Gamma-Gamma q = {self.gg_.q:.3g} <= 1: spend across customers is heavier-"
                "tailed than the model allows, and its mean spend of a customer without "
                f"repeat purchases is infinite; the repeat buyers' average, "
                f"{self.spend_fallback_:.2f}, stands in for it",
                UserWarning,
                stacklevel=2,
            )
        return self

    def components(self, features: pd.DataFrame, horizon_days: int) -> pd.DataFrame:
        """Expected purchase days, P(alive) and expected spend per purchase day."""
        x, t_x, T, m = btyd_inputs(features)
        out = pd.DataFrame(
            {
                "expected_orders": bgnbd_expected(self.bgnbd_, horizon_days, x, t_x, T),
                "p_alive": bgnbd_p_alive(self.bgnbd_, x, t_x, T),
                "expected_spend": gg_expected_spend(
                    self.gg_, x, m, getattr(self, "spend_fallback_", float("nan"))
                ),
            },
            index=features.index,
        )
        bad = ~np.isfinite(out.to_numpy()).all(axis=1)
        if bad.any():  # never let a numerical failure pass as a forecast of zero
            raise ModelError(
                f"BG/NBD+GG ({self.bgnbd_}, {self.gg_}) gives non-finite values for "
                f"{int(bad.sum()):,} of {len(out):,} customers"
            )
        return out

    def predict(self, features: pd.DataFrame, horizon_days: int) -> pd.DataFrame:
        c = self.components(features, horizon_days)
        value = c["expected_orders"].to_numpy() * c["expected_spend"].to_numpy()
        return prediction_frame(features, value, c["expected_orders"], c["p_alive"])
