/* The blend index of llm.data.blended, compiled: sample i goes to the dataset whose share is
 * furthest behind its target, the largest weights[j] * (i + 1) - counts[j], ties to the lowest j.
 * The same IEEE double arithmetic as the Python version (built with -ffp-contract=off so that no
 * fused multiply-subtract changes a rounding), so both give identical indices.
 * dataset_index holds int16 (index_bytes 2) or int32 (4) values, sample_index int32 (4) or int64 (8). */
#include <stdint.h>
#include <stdlib.h>

int llm_blend_index(const double *weights, int64_t num_datasets, int64_t num_samples,
                    void *dataset_index, int index_bytes, void *sample_index, int sample_bytes) {
    int64_t *counts = calloc((size_t)num_datasets, sizeof(int64_t));
    if (counts == NULL) return 1;
    for (int64_t i = 0; i < num_samples; ++i) {
        const double step = (double)(i + 1);
        int64_t best = 0;
        double best_gap = weights[0] * step - (double)counts[0];
        for (int64_t j = 1; j < num_datasets; ++j) {
            const double gap = weights[j] * step - (double)counts[j];
            if (gap > best_gap) {
                best_gap = gap;
                best = j;
            }
        }
        if (index_bytes == 2) ((int16_t *)dataset_index)[i] = (int16_t)best;
        else ((int32_t *)dataset_index)[i] = (int32_t)best;
        if (sample_bytes == 4) ((int32_t *)sample_index)[i] = (int32_t)counts[best];
        else ((int64_t *)sample_index)[i] = counts[best];
        counts[best]++;
    }
    free(counts);
    return 0;
}
