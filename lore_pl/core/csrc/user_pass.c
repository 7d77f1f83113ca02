/*
 * One full-batch pass of the LoRe preference loss and its gradients, reading the features once.
 *
 * The logit of pair i of user u is x_i . V a_u with a_u = softmax(W_u) / tau. Written per user,
 * x_i . (V a_u) costs one multiply-add per feature instead of K, and the gradients need the
 * features only through y_u = sum_i g_i x_i (g_i = d loss / d logit_i):
 *     d loss / d a_u = V^T y_u,        d loss / d V = sum_u y_u a_u^T.
 * So each feature row is read from memory once, and touched twice while it is in cache (the dot
 * product, then y_u += g_i x_i). lore_pl/cpu_kernel.py compiles this file and calls it with one
 * thread per core, each on its own range of users; tests/test_cpu_kernel.py checks it against
 * the PyTorch autograd path of lore_pl/functional.py.
 *
 * Threads: with OpenMP the ranges run on the OpenMP pool, which is PyTorch's own (its libgomp is
 * already loaded under the same name), so no second set of threads competes with PyTorch's
 * spinning workers (measured: the kernel ran 1.6x slower inside a training step than alone).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define LANES 8 /* 8 floats: one AVX register; the compiler splits or narrows it elsewhere */
typedef float lanes_t __attribute__((vector_size(LANES * sizeof(float))));

static inline lanes_t load(const float *p) { lanes_t v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, lanes_t v) { memcpy(p, &v, sizeof v); }
#define INLINE static inline __attribute__((always_inline))

/* Features may be stored as bfloat16 (the top 16 bits of a float32): widened on load, so all
 * arithmetic stays float32 and a step reads half the bytes. BF16 is a compile-time 0 or 1. */
typedef uint16_t halves_t __attribute__((vector_size(LANES * sizeof(uint16_t))));
typedef uint32_t words_t __attribute__((vector_size(LANES * sizeof(uint32_t))));

INLINE lanes_t load_x(const int BF16, const void *x, int64_t j) {
    if (!BF16) return load((const float *)x + j);
    halves_t h;
    memcpy(&h, (const uint16_t *)x + j, sizeof h);
    words_t w = __builtin_convertvector(h, words_t) << 16;
    lanes_t v;
    memcpy(&v, &w, sizeof v);
    return v;
}

INLINE float x_at(const int BF16, const void *x, int64_t j) {
    if (!BF16) return ((const float *)x)[j];
    uint32_t w = (uint32_t)((const uint16_t *)x)[j] << 16;
    float f;
    memcpy(&f, &w, sizeof f);
    return f;
}
#define BLOCK_ROWS 4 /* rows per block: the direction and y are loaded once per block, not per row */
#define BLOCK_COLS 5 /* basis columns per pass over y */

INLINE float total(lanes_t v) {
    float s = 0.0f;
    for (int l = 0; l < LANES; l++) s += v[l];
    return s;
}

/* out[r] = x[r] . direction for R rows */
INLINE void dot_rows(const int R, const int BF16, const void *const *x, const float *direction, int64_t n,
                     float *out) {
    lanes_t s0[BLOCK_ROWS], s1[BLOCK_ROWS];
    for (int r = 0; r < R; r++) s0[r] = s1[r] = (lanes_t){0};
    int64_t j = 0;
    for (; j + 2 * LANES <= n; j += 2 * LANES) {
        lanes_t d0 = load(direction + j), d1 = load(direction + j + LANES);
        for (int r = 0; r < R; r++) {
            s0[r] += load_x(BF16, x[r], j) * d0;
            s1[r] += load_x(BF16, x[r], j + LANES) * d1;
        }
    }
    for (int r = 0; r < R; r++) {
        float s = total(s0[r] + s1[r]);
        for (int64_t t = j; t < n; t++) s += x_at(BF16, x[r], t) * direction[t];
        out[r] = s;
    }
}

/* y += sum_r g[r] x[r] for R rows */
INLINE void axpy_rows(const int R, const int BF16, float *y, const float *g, const void *const *x, int64_t n) {
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES) {
        lanes_t acc = load(y + j);
        for (int r = 0; r < R; r++) acc += g[r] * load_x(BF16, x[r], j);
        store(y + j, acc);
    }
    for (; j < n; j++)
        for (int r = 0; r < R; r++) y[j] += g[r] * x_at(BF16, x[r], j);
}

/* R rows of one user: logits, loss and their share of y. Returns the rows' loss. */
INLINE double rows_pass(const int R, const int BF16, const void *X, int64_t d, const int64_t *order, int64_t p,
                        const float *direction, const float *row_weight, float *logits, float *y) {
    const void *x[BLOCK_ROWS];
    int64_t index[BLOCK_ROWS];
    float logit[BLOCK_ROWS], g[BLOCK_ROWS];
    double loss = 0.0;
    for (int r = 0; r < R; r++) {
        index[r] = order ? order[p + r] : p + r;
        x[r] = (const char *)X + index[r] * d * (BF16 ? sizeof(uint16_t) : sizeof(float));
    }
    dot_rows(R, BF16, x, direction, d, logit);
    for (int r = 0; r < R; r++) {
        int64_t i = index[r];
        logits[i] = logit[r];
        /* softplus(-logit) = -log sigmoid(logit), in a form that never overflows */
        float m = -logit[r];
        float nll = m > 0.0f ? m + log1pf(expf(-m)) : log1pf(expf(m));
        loss += (double)row_weight[i] * nll;
        g[r] = -row_weight[i] / (1.0f + expf(logit[r])); /* d loss / d logit = -c_i sigmoid(-logit) */
    }
    axpy_rows(R, BF16, y, g, x, d);
    return loss;
}

/* direction = sum_k a_k Vt[k], one pass */
static void combine(float *direction, const float *a, const float *Vt, int64_t K, int64_t d) {
    memset(direction, 0, d * sizeof(float));
    for (int64_t k0 = 0; k0 < K; k0 += BLOCK_COLS) {
        int64_t k1 = k0 + BLOCK_COLS < K ? k0 + BLOCK_COLS : K;
        int64_t j = 0;
        for (; j + LANES <= d; j += LANES) {
            lanes_t acc = load(direction + j);
            for (int64_t k = k0; k < k1; k++) acc += a[k] * load(Vt + k * d + j);
            store(direction + j, acc);
        }
        for (; j < d; j++)
            for (int64_t k = k0; k < k1; k++) direction[j] += a[k] * Vt[k * d + j];
    }
}

/* q[k] = Vt[k] . y and, when grad_basis_t, grad_basis_t[k] += a_k y: one pass over y per 5 columns */
static void spread(const float *y, const float *a, const float *Vt, int64_t K, int64_t d, float *q,
                   float *grad_basis_t) {
    for (int64_t k0 = 0; k0 < K; k0 += BLOCK_COLS) {
        int64_t width = K - k0 < BLOCK_COLS ? K - k0 : BLOCK_COLS;
        lanes_t acc[BLOCK_COLS];
        for (int64_t k = 0; k < width; k++) acc[k] = (lanes_t){0};
        int64_t j = 0;
        for (; j + LANES <= d; j += LANES) {
            lanes_t yv = load(y + j);
            for (int64_t k = 0; k < width; k++) {
                acc[k] += load(Vt + (k0 + k) * d + j) * yv;
                if (grad_basis_t) {
                    float *out = grad_basis_t + (k0 + k) * d + j;
                    store(out, load(out) + a[k0 + k] * yv);
                }
            }
        }
        for (int64_t k = 0; k < width; k++) {
            float s = total(acc[k]);
            for (int64_t t = j; t < d; t++) {
                s += Vt[(k0 + k) * d + t] * y[t];
                if (grad_basis_t) grad_basis_t[(k0 + k) * d + t] += a[k0 + k] * y[t];
            }
            q[k0 + k] = s;
        }
    }
}

INLINE double users_pass(const int BF16, const void *X, int64_t d, const int64_t *order, const int64_t *starts,
                         int64_t first, int64_t last, const float *Vt, int64_t K, const float *coef,
                         const float *row_weight, float *logits, float *grad_coef, float *grad_basis_t,
                         int with_basis_grad, float *work) {
    double loss = 0.0;
    float *direction = work, *y = work + d;
    for (int64_t u = first; u < last; u++) {
        const float *a = coef + u * K;
        combine(direction, a, Vt, K, d);
        memset(y, 0, d * sizeof(float));
        int64_t p = starts[u], end = starts[u + 1];
        for (; p + BLOCK_ROWS <= end; p += BLOCK_ROWS)
            loss += rows_pass(BLOCK_ROWS, BF16, X, d, order, p, direction, row_weight, logits, y);
        switch (end - p) { /* constant row counts, so each block's loops unroll */
        case 3: loss += rows_pass(3, BF16, X, d, order, p, direction, row_weight, logits, y); break;
        case 2: loss += rows_pass(2, BF16, X, d, order, p, direction, row_weight, logits, y); break;
        case 1: loss += rows_pass(1, BF16, X, d, order, p, direction, row_weight, logits, y); break;
        }
        spread(y, a, Vt, K, d, grad_coef + u * K, with_basis_grad ? grad_basis_t : NULL);
    }
    return loss;
}

/*
 * Users first..last-1. User u's rows are rows[starts[u]..starts[u+1]) of X [N, d] (float32, or
 * bfloat16 when x_bf16), where rows is `order` (an index, [N]) or, when order is NULL, the identity.
 *   Vt [K, d]: the basis, transposed.     coef [C, K]: a_u, the users' weights over tau.
 *   row_weight [N]: c_i, the loss is sum_i c_i softplus(-logit_i) (pair or user mean, DDP scale).
 * Writes logits [N] (its users' rows), grad_coef [C, K] (its users), and when with_basis_grad,
 * adds sum_u a_u y_u^T into grad_basis_t [K, d]. work: 2 d floats. Returns its users' loss.
 */
double lore_user_pass(const void *X, int x_bf16, int64_t d, const int64_t *order, const int64_t *starts,
                      int64_t first, int64_t last, const float *Vt, int64_t K, const float *coef,
                      const float *row_weight, float *logits, float *grad_coef, float *grad_basis_t,
                      int with_basis_grad, float *work) {
    if (x_bf16)
        return users_pass(1, X, d, order, starts, first, last, Vt, K, coef, row_weight, logits, grad_coef,
                          grad_basis_t, with_basis_grad, work);
    return users_pass(0, X, d, order, starts, first, last, Vt, K, coef, row_weight, logits, grad_coef,
                      grad_basis_t, with_basis_grad, work);
}

/* 1 when compiled with OpenMP: lore_user_pass_ranges then runs its ranges in parallel */
int lore_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/*
 * lore_user_pass on `ranges` ranges of users, range t being users bounds[t]..bounds[t+1]-1, each
 * with its own grad_basis_t + t K d and work + 2 t d, its loss written to losses[t] (summed by the
 * caller in order, so the result does not depend on which thread finishes first).
 */
void lore_user_pass_ranges(const void *X, int x_bf16, int64_t d, const int64_t *order, const int64_t *starts,
                           const int64_t *bounds, int64_t ranges, const float *Vt, int64_t K,
                           const float *coef, const float *row_weight, float *logits, float *grad_coef,
                           float *grad_basis_t, int with_basis_grad, float *work, double *losses) {
#ifdef _OPENMP
#pragma omp parallel for schedule(static, 1) num_threads((int)ranges)
#endif
    for (int64_t t = 0; t < ranges; t++)
        losses[t] = lore_user_pass(X, x_bf16, d, order, starts, bounds[t], bounds[t + 1], Vt, K, coef, row_weight,
                                   logits, grad_coef, grad_basis_t + t * K * d, with_basis_grad,
                                   work + t * 2 * d);
}
