"""analysis: finished studies -> tidy data -> stability, sensitivity, generalization -> report."""
