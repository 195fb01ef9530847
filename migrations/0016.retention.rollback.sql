DROP TABLE pruned_counts;
