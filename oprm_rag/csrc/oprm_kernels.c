/*
 * oprm-rag's native CPU kernels: plain C (C11 atomics and pthreads for one thread pool), no Python or
 * torch headers.
 *
 * Loaded with ctypes by oprm_rag/kernels/native.py, which compiles this file with the
 * system C compiler (at `make install`, else at first use) and falls back to the pure
 * torch code whenever the library is missing. Every function works on float32 buffers
 * (unit stride along channels; other strides given), touches only the rows or blocks
 * [start, stop) it is given (so Python can run disjoint ranges on several threads;
 * ctypes releases the GIL), and allocates nothing. The one exception is the decode
 * step's matrix-vector product, split over this file's own thread pool (see below).
 *
 * Why C: the Mamba-1 recurrence h_t = exp(dt_t * A) h_{t-1} + dt_t x_t B_t needs one
 * exp per (token, channel, state) and a sequential pass over time. In torch that means
 * materialising [t, d, n] tensors and a Python loop of tiny ops; here it is one pass
 * over time that keeps a block of channels' states in L1 and never writes the
 * discretised tensors. A decode step of a small model is dozens of tiny torch ops; here
 * a Mamba-2 mixer step is one call. exp, log and softplus are our own (Cephes'
 * polynomials, ~1 ulp on the ranges used), branch-free so that the loops vectorise;
 * target_clones builds AVX-512, AVX2 and baseline versions, picked at load time.
 */

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>
#define OPRM_HAVE_POOL 1
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define OPRM_PAUSE() _mm_pause()
#else
#define OPRM_PAUSE() ((void)0)
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && (__GNUC__ >= 12)
/* One build for every x86-64 machine: the loader picks the widest vectors the CPU has. */
#define OPRM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && (__GNUC__ >= 6)
#define OPRM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define OPRM_CLONES
#endif

/* exp(x) for x in [-87.3, 88.7] (clamped outside): 2^k * p(r), r = x - k ln 2. */
static inline __attribute__((always_inline)) float oprm_expf(float x) {
    x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
    float kf = x * 1.44269504088896341f;
    kf = (kf + 12582912.0f) - 12582912.0f; /* round to nearest, vectorisable */
    float r = x - kf * 0.693359375f;
    r = r + kf * 2.12194440e-4f;
    float z = r * r;
    float p = 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * z + r + 1.0f;
    int32_t k = (int32_t)kf;
    int32_t bits = (k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* log(x) for finite x > 0 (Cephes' logf polynomial, ~1 ulp), branch-free. */
static inline __attribute__((always_inline)) float oprm_logf(float x) {
    int32_t bits;
    memcpy(&bits, &x, sizeof bits);
    int32_t e = ((bits >> 23) & 0xff) - 126;      /* x = m * 2^e, m in [0.5, 1) */
    int32_t mbits = (bits & 0x007fffff) | 0x3f000000;
    float m;
    memcpy(&m, &mbits, sizeof m);
    const int32_t small = m < 0.707106781186547524f; /* m in [sqrt(.5), sqrt(2)) after this */
    e -= small;
    m = small ? m + m - 1.0f : m - 1.0f;
    const float z = m * m;
    float p = 7.0376836292E-2f;
    p = p * m - 1.1514610310E-1f;
    p = p * m + 1.1676998740E-1f;
    p = p * m - 1.2420140846E-1f;
    p = p * m + 1.4249322787E-1f;
    p = p * m - 1.6668057665E-1f;
    p = p * m + 2.0000714765E-1f;
    p = p * m - 2.4999993993E-1f;
    p = p * m + 3.3333331174E-1f;
    float r = p * m * z;
    const float ef = (float)e;
    r += -2.12194440e-4f * ef;
    r += -0.5f * z;
    return m + r + 0.693359375f * ef;
}

/* torch's softplus (beta 1, threshold 20): x above 20, else log1p(exp(x)). */
static inline __attribute__((always_inline)) float oprm_softplus(float x) {
    const float e = oprm_expf(x < 20.0f ? x : 20.0f);
    const float u = 1.0f + e;
    /* log1p(e) = log(u) - ((u - 1) - e) / u: exact-ish also for tiny e */
    const float l = oprm_logf(u) - ((u - 1.0f) - e) / u;
    return x > 20.0f ? x : l;
}

/* For tests: softplus over a buffer. */
OPRM_CLONES
void oprm_softplus_buf(int64_t count, const float *x, float *out) {
    for (int64_t i = 0; i < count; i++) out[i] = oprm_softplus(x[i]);
}

/* For tests: exp over a buffer, so Python can check it against torch.exp. */
OPRM_CLONES
void oprm_exp(int64_t count, const float *x, float *out) {
    for (int64_t i = 0; i < count; i++) out[i] = oprm_expf(x[i]);
}

/*
 * Mamba-1 selective scan from a state, time-major, vectorised across channels:
 *
 *   h[n] <- exp(dt[t] * A[c, n]) * h[n] + dt[t] * x[t] * B[t, n]
 *   y[t]  = (sum_n h[n] * C[t, n] + D[c] * x[t]) * silu(z[t])       (z == NULL: no gate)
 *
 * per batch row and channel c. x, dt, z, y are [b, t, d]
 * (channel stride 1; batch and time strides given, so views of the projections need
 * no copy), B, C are [b, t, n] (state stride 1), At is A transposed, [n, d]. With
 * dt_bias, dt is the raw projection and is discretised here (softplus(dt + bias));
 * with pads ([b] left pads per row), a row's first pads[r] steps keep its state and
 * output 0. A block of OPRM_LANES channels keeps its [n, OPRM_LANES] state in L1 for
 * the whole pass: no horizontal sums, one exp per (token, channel, state), nothing
 * else written. Runs the blocks [block_start, block_stop), where block i is batch row
 * i / nblocks, channels (i % nblocks) * OPRM_LANES ... (nblocks = ceil(d / LANES)).
 */
#define OPRM_LANES 16
#define OPRM_MAX_STATE_TM 256

typedef struct {
    int64_t batch, time;
} oprm_strides;

static inline __attribute__((always_inline)) void scan_block(int64_t t, int64_t n, int64_t w, int64_t pad,
                              const float *dt_bias, const float *x, oprm_strides sx,
                              const float *dt, oprm_strides sdt, const float *At, int64_t d,
                              const float *B, oprm_strides sb, const float *C, oprm_strides sc,
                              const float *D, const float *z, oprm_strides sz, float *h, float *y,
                              oprm_strides sy) {
    /* x, dt, z, y, D, At, h already offset to this block's first channel (and batch).
       Lanes past w (the last, partial block) compute on zeros and are never stored. */
    float hs[OPRM_MAX_STATE_TM * OPRM_LANES] __attribute__((aligned(64)));
    float at[OPRM_MAX_STATE_TM * OPRM_LANES] __attribute__((aligned(64)));
    float dd[OPRM_LANES] __attribute__((aligned(64)));
    float dv[OPRM_LANES] __attribute__((aligned(64)));
    float xv[OPRM_LANES] __attribute__((aligned(64)));
    float u[OPRM_LANES] __attribute__((aligned(64)));
    float acc[OPRM_LANES] __attribute__((aligned(64)));
    memset(hs, 0, sizeof(float) * (size_t)(n * OPRM_LANES));
    memset(at, 0, sizeof(float) * (size_t)(n * OPRM_LANES));
    memset(dd, 0, sizeof dd);
    memset(dv, 0, sizeof dv);
    memset(xv, 0, sizeof xv);
    for (int64_t k = 0; k < n; k++)
        for (int64_t j = 0; j < w; j++) {
            hs[k * OPRM_LANES + j] = h[j * n + k];
            at[k * OPRM_LANES + j] = At[k * d + j];
        }
    if (D)
        for (int64_t j = 0; j < w; j++) dd[j] = D[j];
    float db[OPRM_LANES] __attribute__((aligned(64)));
    memset(db, 0, sizeof db);
    if (dt_bias)
        for (int64_t j = 0; j < w; j++) db[j] = dt_bias[j];
    float *y0 = y;
    for (int64_t s = 0; s < pad && s < t; s++) /* pads: state kept, output 0 */
        for (int64_t j = 0; j < w; j++) y0[s * sy.time + j] = 0.0f;
    for (int64_t s = pad; s < t; s++) {
        const float *xs = x + s * sx.time, *dts = dt + s * sdt.time;
        const float *Bs = B + s * sb.time, *Cs = C + s * sc.time;
        if (w == OPRM_LANES) {
#pragma omp simd aligned(dv, xv : 64)
            for (int64_t j = 0; j < OPRM_LANES; j++) {
                dv[j] = dts[j];
                xv[j] = xs[j];
            }
        } else {
            for (int64_t j = 0; j < w; j++) {
                dv[j] = dts[j];
                xv[j] = xs[j];
            }
        }
        if (dt_bias) { /* discretise here: softplus(dt + bias), torch's threshold 20 */
#pragma omp simd aligned(dv, db : 64)
            for (int64_t j = 0; j < OPRM_LANES; j++) dv[j] = oprm_softplus(dv[j] + db[j]);
        }
#pragma omp simd aligned(dv, xv, u, acc : 64)
        for (int64_t j = 0; j < OPRM_LANES; j++) {
            u[j] = dv[j] * xv[j];
            acc[j] = 0.0f;
        }
        for (int64_t k = 0; k < n; k++) {
            const float bk = Bs[k], ck = Cs[k];
            float *hk = hs + k * OPRM_LANES;
            const float *ak = at + k * OPRM_LANES;
#pragma omp simd aligned(hk, ak, dv, u, acc : 64)
            for (int64_t j = 0; j < OPRM_LANES; j++) {
                const float hv = oprm_expf(dv[j] * ak[j]) * hk[j] + u[j] * bk;
                hk[j] = hv;
                acc[j] += hv * ck;
            }
        }
        float *ys = y + s * sy.time;
        float out[OPRM_LANES] __attribute__((aligned(64)));
        float zv[OPRM_LANES] __attribute__((aligned(64)));
        if (z) {
            const float *zs = z + s * sz.time;
            if (w == OPRM_LANES) {
#pragma omp simd aligned(zv : 64)
                for (int64_t j = 0; j < OPRM_LANES; j++) zv[j] = zs[j];
            } else {
                for (int64_t j = 0; j < OPRM_LANES; j++) zv[j] = j < w ? zs[j] : 0.0f;
            }
#pragma omp simd aligned(out, acc, dd, xv, zv : 64)
            for (int64_t j = 0; j < OPRM_LANES; j++)
                out[j] = (acc[j] + dd[j] * xv[j]) * (zv[j] / (1.0f + oprm_expf(-zv[j])));
        } else {
#pragma omp simd aligned(out, acc, dd, xv : 64)
            for (int64_t j = 0; j < OPRM_LANES; j++) out[j] = acc[j] + dd[j] * xv[j];
        }
        if (w == OPRM_LANES) {
#pragma omp simd aligned(out : 64)
            for (int64_t j = 0; j < OPRM_LANES; j++) ys[j] = out[j];
        } else {
            for (int64_t j = 0; j < w; j++) ys[j] = out[j];
        }
    }
    for (int64_t k = 0; k < n; k++)
        for (int64_t j = 0; j < w; j++) h[j * n + k] = hs[k * OPRM_LANES + j];
}

OPRM_CLONES
int oprm_mamba1_scan_tm(int64_t b, int64_t d, int64_t t, int64_t n,
                        const float *x, int64_t x_bs, int64_t x_ts,
                        const float *dt, int64_t dt_bs, int64_t dt_ts, const float *dt_bias, const int64_t *pads,
                        const float *At, const float *B, int64_t b_bs, int64_t b_ts,
                        const float *C, int64_t c_bs, int64_t c_ts, const float *D,
                        const float *z, int64_t z_bs, int64_t z_ts,
                        float *h, float *y, int64_t y_bs, int64_t y_ts,
                        int64_t block_start, int64_t block_stop) {
    if (n > OPRM_MAX_STATE_TM) return -1;
    (void)b;
    const int64_t nblocks = (d + OPRM_LANES - 1) / OPRM_LANES;
    for (int64_t i = block_start; i < block_stop; i++) {
        const int64_t bi = i / nblocks, c0 = (i % nblocks) * OPRM_LANES;
        const int64_t w = d - c0 < OPRM_LANES ? d - c0 : OPRM_LANES;
        oprm_strides sx = {x_bs, x_ts}, sdt = {dt_bs, dt_ts}, sb = {b_bs, b_ts}, sc = {c_bs, c_ts};
        oprm_strides sz = {z_bs, z_ts}, sy = {y_bs, y_ts};
        scan_block(t, n, w, pads ? pads[bi] : 0, dt_bias ? dt_bias + c0 : NULL,
                   x + bi * x_bs + c0, sx, dt + bi * dt_bs + c0, sdt, At + c0, d, B + bi * b_bs, sb,
                   C + bi * c_bs, sc, D ? D + c0 : NULL, z ? z + bi * z_bs + c0 : NULL, sz,
                   h + (bi * d + c0) * n, y + bi * y_bs + c0, sy);
    }
    return 0;
}

/*
 * Causal depthwise conv (kernel K) over time-major input, from a conv state, with
 * optional left padding and SiLU: what Mamba's mixers run before the scan.
 *
 * x: [b, t, d] (unit channel stride, given strides); state: [b, d, K-1] (contiguous, the
 * previous K-1 inputs); wT: [K, d] (the conv weight transposed, so that a tap is a
 * contiguous row); bias: [d] or NULL; pads: [b] left pads per row or NULL. A row's pads
 * are moved in front of its conv state, so its first real token sees the state (as
 * shifted_conv_input does). out: [b, t, d] contiguous (0 at pads); new_state: [b, d,
 * K-1], the last K-1 inputs after this call.
 *
 * Runs units [unit_start, unit_stop) of (batch row, OPRM_CONV_T tokens), each a pass over
 * whole rows: x is read and out written row by row, contiguously. (Blocks of a few
 * channels walked down the time axis read one cache line per 13 KB-strided row, which
 * makes the conv latency-bound: at 130M it took 18% of OPRM's selection.) A row of the
 * virtual sequence [state, x[pad:]] is a state column while its index is below K-1.
 */
#define OPRM_MAX_K 16
#define OPRM_CONV_T 32

OPRM_CLONES
int oprm_conv_tm(int64_t b, int64_t d, int64_t t, int64_t K, const float *x, int64_t x_bs, int64_t x_ts,
                 const float *state, const float *wT, const float *bias, const int64_t *pads, int act,
                 float *out, float *new_state, int64_t unit_start, int64_t unit_stop) {
    if (K > OPRM_MAX_K || K < 1) return -1;
    (void)b;
    const int64_t nunits = (t + OPRM_CONV_T - 1) / OPRM_CONV_T, k1 = K - 1;
    for (int64_t u = unit_start; u < unit_stop; u++) {
        const int64_t bi = u / nunits, s0 = (u % nunits) * OPRM_CONV_T;
        const int64_t s1 = s0 + OPRM_CONV_T < t ? s0 + OPRM_CONV_T : t;
        const int64_t p = pads ? (pads[bi] < t ? pads[bi] : t) : 0;
        const float *xb = x + bi * x_bs, *st = state + bi * d * k1;
        float *ob = out + bi * t * d;
        for (int64_t s = s0; s < s1; s++) {
            float *o = ob + s * d;
            if (s < p) {
                memset(o, 0, (size_t)d * sizeof(float));
                continue;
            }
            if (bias) memcpy(o, bias, (size_t)d * sizeof(float));
            else memset(o, 0, (size_t)d * sizeof(float));
            for (int64_t k = 0; k < K; k++) {
                const int64_t v = s - p + k; /* index in [state (k1 rows), x[p:]] */
                const float *wk = wT + k * d;
                if (v >= k1) {
                    const float *xr = xb + (v - k1 + p) * x_ts;
#pragma omp simd
                    for (int64_t c = 0; c < d; c++) o[c] += wk[c] * xr[c];
                } else {
                    for (int64_t c = 0; c < d; c++) o[c] += wk[c] * st[c * k1 + v];
                }
            }
            if (act)
#pragma omp simd
                for (int64_t c = 0; c < d; c++) o[c] = o[c] / (1.0f + oprm_expf(-o[c]));
        }
        if (s1 == t) { /* the row's last unit writes its new state: virtual rows t-p .. t-p+k1-1 */
            float *ns = new_state + bi * d * k1;
            for (int64_t i = 0; i < k1; i++) {
                const int64_t v = t - p + i;
                if (v >= k1) {
                    const float *xr = xb + (v - k1 + p) * x_ts;
                    for (int64_t c = 0; c < d; c++) ns[c * k1 + i] = xr[c];
                } else {
                    for (int64_t c = 0; c < d; c++) ns[c * k1 + i] = st[c * k1 + v];
                }
            }
        }
    }
    return 0;
}

/*
 * One decode step of a Mamba-2 mixer for rows [row_start, row_stop), everything between
 * in_proj and out_proj: the conv as a dot product with the conv state (updated in place),
 * SiLU, dt = softplus(dt + bias) clamped, the SSD state update (in place) with the
 * Stuffed-Mamba scalings, y = C.h + D x, the SiLU(gate) and the grouped RMS norm.
 *
 * zxbcdt: [b, ld] rows of in_proj's output: gate [heads*p], then x [heads*p], B [g*n],
 * C [g*n] (conv_dim = heads*p + 2*g*n), then dt [heads]. conv_state: [b, conv_dim, K-1];
 * conv_w: [conv_dim, K]; conv_b: [conv_dim] or NULL; dt_bias, A, D: [heads]; h: [b, heads, p, n];
 * norm_w: [heads*p]; scratch: [b, conv_dim]; y: [b, heads*p], the normed output.
 */
OPRM_CLONES
int oprm_mamba2_step(int64_t b, int64_t heads, int64_t p, int64_t n, int64_t g, int64_t K, const float *zxbcdt,
                     int64_t ld, float *conv_state, const float *conv_w, const float *conv_b, const float *dt_bias,
                     float dt_lo, float dt_hi, const float *A, const float *D, float *h, const float *norm_w,
                     int64_t norm_groups, float eps, float alpha_scale, float b_scale, int normalize,
                     float *scratch, float *y, int64_t row_start, int64_t row_stop) {
    (void)b;
    if (K < 1 || K > OPRM_MAX_K || g < 1 || heads % g != 0 || norm_groups < 1 || (heads * p) % norm_groups != 0)
        return -1;
    const int64_t di = heads * p, gn = g * n, conv_dim = di + 2 * gn, k1 = K - 1, hpg = heads / g;
    for (int64_t r = row_start; r < row_stop; r++) {
        const float *row = zxbcdt + r * ld;
        const float *gate = row, *xbc_in = row + di, *dt_raw = row + di + conv_dim;
        float *cs = conv_state + r * conv_dim * k1;
        float *xbc = scratch + r * conv_dim;
        for (int64_t c = 0; c < conv_dim; c++) {
            const float *w = conv_w + c * K;
            float *st = cs + c * k1;
            const float v = xbc_in[c];
            float acc = conv_b ? conv_b[c] : 0.0f;
            for (int64_t k = 0; k < k1; k++) acc += w[k] * st[k];
            acc += w[k1] * v;
            for (int64_t k = 0; k + 1 < k1; k++) st[k] = st[k + 1];
            if (k1 > 0) st[k1 - 1] = v;
            xbc[c] = acc / (1.0f + oprm_expf(-acc));
        }
        const float *x = xbc, *Bv = xbc + di, *Cv = xbc + di + gn;
        float *yr = y + r * di;
        float *hr = h + r * heads * p * n;
        for (int64_t hh = 0; hh < heads; hh++) {
            float dt = oprm_softplus(dt_raw[hh] + dt_bias[hh]);
            dt = dt < dt_lo ? dt_lo : (dt > dt_hi ? dt_hi : dt);
            float decay = oprm_expf(dt * A[hh]);
            if (alpha_scale != 1.0f && dt > 0.0f) decay *= alpha_scale;
            const float *Bg = Bv + (hh / hpg) * n, *Cg = Cv + (hh / hpg) * n;
            float *hh_state = hr + hh * p * n;
            float sq = 0.0f;
            for (int64_t pi = 0; pi < p; pi++) {
                float *hs = hh_state + pi * n;
                const float u = x[hh * p + pi] * dt * b_scale;
                float acc = 0.0f, s2 = 0.0f;
#pragma omp simd reduction(+ : acc, s2)
                for (int64_t k = 0; k < n; k++) {
                    const float v = decay * hs[k] + u * Bg[k];
                    hs[k] = v;
                    acc += v * Cg[k];
                    s2 += v * v;
                }
                yr[hh * p + pi] = acc;
                sq += s2;
            }
            if (normalize) { /* h <- h / ||h|| per head, so y = C.h / ||h|| */
                float norm = sqrtf(sq);
                norm = norm < 1e-12f ? 1e-12f : norm;
                const float inv = 1.0f / norm;
                for (int64_t q = 0; q < p * n; q++) hh_state[q] *= inv;
                for (int64_t pi = 0; pi < p; pi++) yr[hh * p + pi] *= inv;
            }
            for (int64_t pi = 0; pi < p; pi++) yr[hh * p + pi] += D[hh] * x[hh * p + pi];
        }
        for (int64_t q = 0; q < di; q++) {
            const float gv = gate[q];
            yr[q] *= gv / (1.0f + oprm_expf(-gv));
        }
        const int64_t gs = di / norm_groups;
        for (int64_t ng = 0; ng < norm_groups; ng++) {
            float *seg = yr + ng * gs;
            float ms = 0.0f;
            for (int64_t q = 0; q < gs; q++) ms += seg[q] * seg[q];
            const float inv = 1.0f / sqrtf(ms / (float)gs + eps);
            for (int64_t q = 0; q < gs; q++) seg[q] = norm_w[ng * gs + q] * (seg[q] * inv);
        }
    }
    return 0;
}

/*
 * Mamba-2 (SSD) scan over time-major input, as the recurrence itself: for each
 * (batch row, head, block of rows_per_unit state rows) unit, h <- exp(dt A) h + dt x B^T
 * and y = h C, one token at a time. A state row (one of the head's p channels) depends on
 * nothing but its own channel, so a head splits into independent blocks: many more units
 * than heads, which keeps every thread busy on a many-core machine.
 *
 * Why not the chunked matrix form on CPU: per token and head the recurrence is p*n
 * multiply-adds for the update and p*n for the output, with the head's [p, n] state
 * (32 KB at p=64, n=128) kept in L1 for the whole sequence; the chunked form does the
 * same O(p n) work as small matrix products (K = chunk length) plus O(L) work on L x L
 * decay matrices, and writes them all to memory. Units are independent, so Python runs
 * disjoint unit ranges [start, stop) on several threads.
 *
 * x: [b, t, heads*p]; dt: [b, t, heads] (discretised: softplus, clamp, pads 0); A: [heads];
 * B, C: [b, t, g*n] (heads of a group share them); all with unit last stride and the
 * given batch/time strides. h: [b, heads, p, n] contiguous, updated in place.
 * y: [b, t, heads*p] with the given strides (no D skip, no gate). alpha_scale and b_scale
 * are the Stuffed-Mamba scales (1: none); alpha applies on steps with dt > 0 only.
 */
OPRM_CLONES
int oprm_mamba2_scan_tm(int64_t b, int64_t t, int64_t heads, int64_t p, int64_t n, int64_t g,
                        const float *x, int64_t x_bs, int64_t x_ts, const float *dt, int64_t dt_bs, int64_t dt_ts,
                        const float *A, const float *B, int64_t b_bs, int64_t b_ts,
                        const float *C, int64_t c_bs, int64_t c_ts, float alpha_scale, float b_scale,
                        float *h, float *y, int64_t y_bs, int64_t y_ts, int64_t rows_per_unit,
                        int64_t unit_start, int64_t unit_stop) {
    (void)b;
    if (g < 1 || heads % g != 0 || rows_per_unit < 1) return -1;
    const int64_t hpg = heads / g, blocks = (p + rows_per_unit - 1) / rows_per_unit;
    for (int64_t u = unit_start; u < unit_stop; u++) {
        const int64_t bi = u / (heads * blocks), hh = (u / blocks) % heads, gi = hh / hpg;
        const int64_t p0 = (u % blocks) * rows_per_unit, p1 = p0 + rows_per_unit < p ? p0 + rows_per_unit : p;
        float *state = h + (bi * heads + hh) * p * n;
        const float a = A[hh];
        for (int64_t s = 0; s < t; s++) {
            const float d = dt[bi * dt_bs + s * dt_ts + hh];
            float decay = oprm_expf(d * a);
            if (alpha_scale != 1.0f && d > 0.0f) decay *= alpha_scale;
            const float du = d * b_scale;
            const float *xs = x + bi * x_bs + s * x_ts + hh * p;
            const float *Bs = B + bi * b_bs + s * b_ts + gi * n;
            const float *Cs = C + bi * c_bs + s * c_ts + gi * n;
            float *ys = y + bi * y_bs + s * y_ts + hh * p;
            int64_t pi = p0;
            for (; pi + 4 <= p1; pi += 4) { /* four rows per pass: B and C loaded once for all four */
                float *h0 = state + pi * n, *h1 = h0 + n, *h2 = h1 + n, *h3 = h2 + n;
                const float w0 = xs[pi] * du, w1 = xs[pi + 1] * du, w2 = xs[pi + 2] * du, w3 = xs[pi + 3] * du;
                float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
                for (int64_t k = 0; k < n; k++) {
                    const float bk = Bs[k], ck = Cs[k];
                    const float v0 = decay * h0[k] + w0 * bk, v1 = decay * h1[k] + w1 * bk;
                    const float v2 = decay * h2[k] + w2 * bk, v3 = decay * h3[k] + w3 * bk;
                    h0[k] = v0; h1[k] = v1; h2[k] = v2; h3[k] = v3;
                    a0 += v0 * ck; a1 += v1 * ck; a2 += v2 * ck; a3 += v3 * ck;
                }
                ys[pi] = a0; ys[pi + 1] = a1; ys[pi + 2] = a2; ys[pi + 3] = a3;
            }
            for (; pi < p1; pi++) {
                float *hs = state + pi * n;
                const float w = xs[pi] * du;
                float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                for (int64_t k = 0; k < n; k++) {
                    const float v = decay * hs[k] + w * Bs[k];
                    hs[k] = v;
                    acc += v * Cs[k];
                }
                ys[pi] = acc;
            }
        }
    }
    return 0;
}

/*
 * y[bi, r] = W[r, :] . x[bi, :] (+ bias[r]) for rows [row_start, row_stop) of a [rows, k]
 * weight with row stride ld, for nb input rows (x row stride xs, y row stride ys): a
 * decode step's projections and LM head. At a few tokens a projection is one pass over
 * its weights (memory-bound), so what matters is reading each weight once, at full
 * bandwidth, on every core: a block of weight rows is read from memory once and reused
 * from L1 for every input row. torch's bf16 matrix-vector product reads bf16 weights at
 * a fraction of the bus speed, and its threads spin at a barrier per op. The bf16 variant
 * widens each weight to float32 (a 16-bit shift, exact) and accumulates in float32: half
 * the bytes of float32 weights, the same arithmetic on the widened values.
 */
OPRM_CLONES
void oprm_gemv_f32(int64_t k, const float *W, int64_t ld, int64_t nb, const float *x, int64_t xs,
                   const float *bias, float *y, int64_t ys, int64_t row_start, int64_t row_stop) {
    int64_t r = row_start;
    for (; r + 4 <= row_stop; r += 4) {
        const float *w0 = W + r * ld, *w1 = w0 + ld, *w2 = w1 + ld, *w3 = w2 + ld;
        for (int64_t bi = 0; bi < nb; bi++) {
            const float *xb = x + bi * xs;
            float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
            for (int64_t i = 0; i < k; i++) {
                const float v = xb[i];
                a0 += w0[i] * v; a1 += w1[i] * v; a2 += w2[i] * v; a3 += w3[i] * v;
            }
            float *yb = y + bi * ys;
            yb[r] = a0 + (bias ? bias[r] : 0.0f); yb[r + 1] = a1 + (bias ? bias[r + 1] : 0.0f);
            yb[r + 2] = a2 + (bias ? bias[r + 2] : 0.0f); yb[r + 3] = a3 + (bias ? bias[r + 3] : 0.0f);
        }
    }
    for (; r < row_stop; r++) {
        const float *w0 = W + r * ld;
        for (int64_t bi = 0; bi < nb; bi++) {
            const float *xb = x + bi * xs;
            float a0 = 0.0f;
#pragma omp simd reduction(+ : a0)
            for (int64_t i = 0; i < k; i++) a0 += w0[i] * xb[i];
            y[bi * ys + r] = a0 + (bias ? bias[r] : 0.0f);
        }
    }
}

static inline __attribute__((always_inline)) float oprm_bits_f(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* The bf16 rows are read as 32-bit pairs: the high half is the odd element, the low half
 * (shifted up) the even one, against x split into its even and odd elements once per
 * call: two integer ops and two multiply-adds per pair, all in 32-bit lanes, so it
 * vectorises at float32 width without a widening shuffle. Needs k even, a 4-byte aligned
 * W and k/2 <= OPRM_GEMV_PAIRS_MAX (the caller checks; returns -1 otherwise). */
#define OPRM_GEMV_PAIRS_MAX 8192
#define OPRM_GEMV_BATCH_MAX 16

OPRM_CLONES
int oprm_gemv_bf16(int64_t k, const uint16_t *W, int64_t ld, int64_t nb, const float *x, int64_t xs,
                   const float *bias, float *y, int64_t ys, int64_t row_start, int64_t row_stop) {
    if ((k & 1) || (ld & 1) || k / 2 > OPRM_GEMV_PAIRS_MAX || ((uintptr_t)W & 3) || nb > OPRM_GEMV_BATCH_MAX)
        return -1;
    const int64_t k2 = k / 2;
    static __thread float xe[OPRM_GEMV_BATCH_MAX * OPRM_GEMV_PAIRS_MAX], xo[OPRM_GEMV_BATCH_MAX * OPRM_GEMV_PAIRS_MAX];
    for (int64_t bi = 0; bi < nb; bi++)
        for (int64_t j = 0; j < k2; j++) {
            xe[bi * k2 + j] = x[bi * xs + 2 * j];
            xo[bi * k2 + j] = x[bi * xs + 2 * j + 1];
        }
    for (int64_t r = row_start; r < row_stop; r++) {
        const uint32_t *w0 = (const uint32_t *)(W + r * ld);
        for (int64_t bi = 0; bi < nb; bi++) {
            const float *e = xe + bi * k2, *o = xo + bi * k2;
            float a0 = 0.0f, b0 = 0.0f;
#pragma omp simd reduction(+ : a0, b0)
            for (int64_t j = 0; j < k2; j++) {
                a0 += oprm_bits_f(w0[j] << 16) * e[j];
                b0 += oprm_bits_f(w0[j] & 0xFFFF0000u) * o[j];
            }
            y[bi * ys + r] = a0 + b0 + (bias ? bias[r] : 0.0f);
        }
    }
    return 0;
}

/*
 * What follows the Mamba-2 scan, in one pass per token instead of six torch passes over
 * [b, t, heads*p]: y <- w * rmsnorm_groups((y + D x) * silu(z)) (transformers'
 * MambaRMSNormGated with the D skip folded in). y: [b, t, di] (given strides), updated in
 * place; x, z: [b, t, di] views (unit last stride, given strides); D: [heads] (one per
 * head of p channels); w: [di]. Runs tokens [start, stop) of the b*t (row-major) tokens.
 */
OPRM_CLONES
int oprm_gated_norm_tm(int64_t t, int64_t heads, int64_t p, float *y, int64_t y_bs, int64_t y_ts,
                       const float *x, int64_t x_bs, int64_t x_ts, const float *z, int64_t z_bs, int64_t z_ts,
                       const float *D, const float *w, int64_t norm_groups, float eps, int64_t start, int64_t stop) {
    const int64_t di = heads * p;
    if (norm_groups < 1 || di % norm_groups != 0) return -1;
    const int64_t gs = di / norm_groups;
    for (int64_t r = start; r < stop; r++) {
        const int64_t bi = r / t, ti = r % t;
        float *yr = y + bi * y_bs + ti * y_ts;
        const float *xr = x + bi * x_bs + ti * x_ts, *zr = z + bi * z_bs + ti * z_ts;
        for (int64_t hh = 0; hh < heads; hh++) {
            const float d = D[hh];
            float *yh = yr + hh * p;
            const float *xh = xr + hh * p, *zh = zr + hh * p;
#pragma omp simd
            for (int64_t q = 0; q < p; q++) {
                const float g = zh[q];
                yh[q] = (yh[q] + d * xh[q]) * (g / (1.0f + oprm_expf(-g)));
            }
        }
        for (int64_t ng = 0; ng < norm_groups; ng++) {
            float *seg = yr + ng * gs;
            const float *ws = w + ng * gs;
            float ms = 0.0f;
#pragma omp simd reduction(+ : ms)
            for (int64_t q = 0; q < gs; q++) ms += seg[q] * seg[q];
            const float inv = 1.0f / sqrtf(ms / (float)gs + eps);
#pragma omp simd
            for (int64_t q = 0; q < gs; q++) seg[q] = ws[q] * (seg[q] * inv);
        }
    }
    return 0;
}

/*
 * A small thread pool for the decode step's matrix-vector products.
 *
 * A decode step of a 130M model is ~50 products of 0.6-40 MB of weights each, back to
 * back, a few hundred microseconds apiece. Handing a part to a Python thread (a future,
 * a condition variable, the GIL) costs about as much as the part itself, so two threads
 * decoded slower than one. Here the caller publishes a job and takes part 0; workers spin
 * for up to OPRM_SPIN_NS waiting for the next job (the next product follows within
 * microseconds while decoding), then sleep on a condition variable, so an idle process
 * costs nothing. Every worker takes part in every job (with an empty range when the job
 * has fewer parts), so the caller's wait for all of them to finish also guarantees that
 * no worker still reads the previous job when the next one is published. One job at a
 * time: a caller that finds the pool busy (another Python thread decoding) runs its
 * product alone. A forked child starts a fresh pool.
 */
#ifdef OPRM_HAVE_POOL
#define OPRM_POOL_MAX 64
#define OPRM_SPIN_NS 200000LL

typedef void (*oprm_part_fn)(const void *ctx, int64_t start, int64_t stop);

static struct {
    pthread_mutex_t busy, sleep_lock;
    pthread_cond_t wake;
    atomic_ullong gen;
    atomic_int pending;
    int workers;
    pid_t pid;
    oprm_part_fn fn;
    const void *ctx;
    int64_t bounds[OPRM_POOL_MAX + 1];
    unsigned long long born[OPRM_POOL_MAX + 1];
    int parts;
} oprm_pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

static int64_t oprm_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void *oprm_worker(void *arg) {
    const int me = (int)(intptr_t)arg; /* 1..workers; the caller is part 0 */
    unsigned long long seen = oprm_pool.born[me]; /* the generation before its first job */
    for (;;) {
        unsigned long long g = atomic_load_explicit(&oprm_pool.gen, memory_order_acquire);
        if (g == seen) {
            const int64_t until = oprm_now_ns() + OPRM_SPIN_NS;
            int spins = 0;
            while ((g = atomic_load_explicit(&oprm_pool.gen, memory_order_acquire)) == seen) {
                OPRM_PAUSE();
                if ((++spins & 255) == 0 && oprm_now_ns() > until) {
                    pthread_mutex_lock(&oprm_pool.sleep_lock);
                    while ((g = atomic_load(&oprm_pool.gen)) == seen)
                        pthread_cond_wait(&oprm_pool.wake, &oprm_pool.sleep_lock);
                    pthread_mutex_unlock(&oprm_pool.sleep_lock);
                    break;
                }
            }
        }
        seen = g;
        if (me < oprm_pool.parts && oprm_pool.bounds[me] < oprm_pool.bounds[me + 1])
            oprm_pool.fn(oprm_pool.ctx, oprm_pool.bounds[me], oprm_pool.bounds[me + 1]);
        atomic_fetch_sub_explicit(&oprm_pool.pending, 1, memory_order_acq_rel);
    }
    return NULL;
}

/* Runs fn over [0, rows) in `parts` ranges aligned to `align` rows, part 0 on this thread. */
static void oprm_pool_run(oprm_part_fn fn, const void *ctx, int64_t rows, int parts, int64_t align) {
    if (parts > OPRM_POOL_MAX) parts = OPRM_POOL_MAX;
    if (parts <= 1 || pthread_mutex_trylock(&oprm_pool.busy) != 0) {
        fn(ctx, 0, rows);
        return;
    }
    if (oprm_pool.pid != getpid()) { /* first use, or a forked child: no workers exist here */
        /* A child's copies of the lock and the condition variable may record the parent's
         * sleeping workers (a broadcast would wait for them): start both afresh. */
        pthread_mutex_init(&oprm_pool.sleep_lock, NULL);
        pthread_cond_init(&oprm_pool.wake, NULL);
        oprm_pool.workers = 0;
        oprm_pool.pid = getpid();
    }
    while (oprm_pool.workers < parts - 1) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        /* Read by the worker, which may start after this job is published: it must not skip it. */
        oprm_pool.born[oprm_pool.workers + 1] = atomic_load(&oprm_pool.gen);
        const int ok = pthread_create(&th, &attr, oprm_worker, (void *)(intptr_t)(oprm_pool.workers + 1)) == 0;
        pthread_attr_destroy(&attr);
        if (!ok) break;
        oprm_pool.workers++;
    }
    if (parts > oprm_pool.workers + 1) parts = oprm_pool.workers + 1;
    oprm_pool.fn = fn;
    oprm_pool.ctx = ctx;
    oprm_pool.parts = parts;
    for (int i = 0; i <= parts; i++) {
        int64_t b = rows * i / parts;
        oprm_pool.bounds[i] = i == parts ? rows : b - b % align;
    }
    atomic_store(&oprm_pool.pending, oprm_pool.workers);
    pthread_mutex_lock(&oprm_pool.sleep_lock);
    atomic_fetch_add_explicit(&oprm_pool.gen, 1, memory_order_release);
    pthread_cond_broadcast(&oprm_pool.wake);
    pthread_mutex_unlock(&oprm_pool.sleep_lock);
    if (oprm_pool.bounds[0] < oprm_pool.bounds[1]) fn(ctx, oprm_pool.bounds[0], oprm_pool.bounds[1]);
    while (atomic_load_explicit(&oprm_pool.pending, memory_order_acquire) > 0) OPRM_PAUSE();
    pthread_mutex_unlock(&oprm_pool.busy);
}
#endif

typedef struct {
    int bf16;
    int64_t k, ld, nb, xs, ys;
    const void *W;
    const float *x, *bias;
    float *y;
} oprm_gemv_job;

static void oprm_gemv_part(const void *ctx, int64_t start, int64_t stop) {
    const oprm_gemv_job *j = (const oprm_gemv_job *)ctx;
    if (j->bf16)
        oprm_gemv_bf16(j->k, (const uint16_t *)j->W, j->ld, j->nb, j->x, j->xs, j->bias, j->y, j->ys, start, stop);
    else
        oprm_gemv_f32(j->k, (const float *)j->W, j->ld, j->nb, j->x, j->xs, j->bias, j->y, j->ys, start, stop);
}

/* y = W x + bias over all `rows`, split over `threads` threads of the pool (bf16: W holds
 * bf16 rows, with oprm_gemv_bf16's limits, checked here: returns -1 when it does not take
 * the shapes). Without pthreads it runs on the calling thread. */
int oprm_gemv_mt(int bf16, int64_t k, const void *W, int64_t ld, int64_t nb, const float *x, int64_t xs,
                 const float *bias, float *y, int64_t ys, int64_t rows, int threads) {
    if (bf16 && ((k & 1) || (ld & 1) || k / 2 > OPRM_GEMV_PAIRS_MAX || ((uintptr_t)W & 3) || nb > OPRM_GEMV_BATCH_MAX))
        return -1;
    oprm_gemv_job job = {bf16, k, ld, nb, xs, ys, W, x, bias, y};
#ifdef OPRM_HAVE_POOL
    oprm_pool_run(oprm_gemv_part, &job, rows, threads, 4);
#else
    (void)threads;
    oprm_gemv_part(&job, 0, rows);
#endif
    return 0;
}
