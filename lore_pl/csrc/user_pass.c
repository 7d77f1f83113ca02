/*
 * One full-batch pass of the LoRe preference loss and its gradients, reading the features once.
 *
 * The logit of pair i of user u is x_i . V a_u with a_u = softmax(W_u) / tau. Written per user,
 * x_i . (V a_u) costs one multiply-add per feature instead of K, and the gradients need the
 * features only through y_u = sum_i g_i x_i (g_i = d loss / d logit_i):
 *     d loss / d a_u = V^T y_u,        d loss / d V = sum_u y_u a_u^T.
 * So each feature row is read from memory once, and touched twice while it is in cache (the dot
 * product, then y_u += g_i x_i). lore_pl/cpu_kernel.py compiles this file and calls it from one
 * thread per core, each on its own range of users; tests/test_cpu_kernel.py checks it against
 * the PyTorch autograd path of lore_pl/functional.py.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define LANES 8 /* 8 floats: one AVX register; the compiler splits or narrows it elsewhere */
typedef float lanes_t __attribute__((vector_size(LANES * sizeof(float))));

static inline lanes_t load(const float *p) { lanes_t v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, lanes_t v) { memcpy(p, &v, sizeof v); }

static float dot(const float *a, const float *b, int64_t n) {
    /* four independent accumulators keep the multiply-add units busy */
    lanes_t s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    int64_t j = 0;
    for (; j + 4 * LANES <= n; j += 4 * LANES) {
        s0 += load(a + j) * load(b + j);
        s1 += load(a + j + LANES) * load(b + j + LANES);
        s2 += load(a + j + 2 * LANES) * load(b + j + 2 * LANES);
        s3 += load(a + j + 3 * LANES) * load(b + j + 3 * LANES);
    }
    lanes_t sum = (s0 + s1) + (s2 + s3);
    float s = 0.0f;
    for (int l = 0; l < LANES; l++) s += sum[l];
    for (; j < n; j++) s += a[j] * b[j];
    return s;
}

static void axpy(float *y, float g, const float *x, int64_t n) { /* y += g x */
    int64_t j = 0;
    for (; j + 2 * LANES <= n; j += 2 * LANES) {
        store(y + j, load(y + j) + g * load(x + j));
        store(y + j + LANES, load(y + j + LANES) + g * load(x + j + LANES));
    }
    for (; j < n; j++) y[j] += g * x[j];
}

/*
 * Users first..last-1. User u's rows are rows[starts[u]..starts[u+1]) of X [N, d], where rows is
 * `order` (an index, [N]) or, when order is NULL, the identity.
 *   Vt [K, d]: the basis, transposed.     coef [C, K]: a_u, the users' weights over tau.
 *   row_weight [N]: c_i, the loss is sum_i c_i softplus(-logit_i) (pair or user mean, DDP scale).
 * Writes logits [N] (its users' rows), grad_coef [C, K] (its users), and when with_basis_grad,
 * adds sum_u a_u y_u^T into grad_basis_t [K, d]. work: 2 d floats. Returns its users' loss.
 */
double lore_user_pass(const float *X, int64_t d, const int64_t *order, const int64_t *starts,
                      int64_t first, int64_t last, const float *Vt, int64_t K, const float *coef,
                      const float *row_weight, float *logits, float *grad_coef, float *grad_basis_t,
                      int with_basis_grad, float *work) {
    double loss = 0.0;
    float *direction = work, *y = work + d;
    for (int64_t u = first; u < last; u++) {
        const float *a = coef + u * K;
        memset(direction, 0, d * sizeof(float));
        for (int64_t k = 0; k < K; k++) axpy(direction, a[k], Vt + k * d, d);
        memset(y, 0, d * sizeof(float));
        for (int64_t p = starts[u]; p < starts[u + 1]; p++) {
            int64_t i = order ? order[p] : p;
            const float *x = X + i * d;
            float logit = dot(x, direction, d);
            logits[i] = logit;
            /* softplus(-logit) = -log sigmoid(logit), in a form that never overflows */
            float m = -logit;
            float nll = m > 0.0f ? m + log1pf(expf(-m)) : log1pf(expf(m));
            loss += (double)row_weight[i] * nll;
            axpy(y, -row_weight[i] / (1.0f + expf(logit)), x, d); /* g_i = -c_i sigmoid(-logit) */
        }
        for (int64_t k = 0; k < K; k++) grad_coef[u * K + k] = dot(Vt + k * d, y, d);
        if (with_basis_grad)
            for (int64_t k = 0; k < K; k++) axpy(grad_basis_t + k * d, a[k], y, d);
    }
    return loss;
}
