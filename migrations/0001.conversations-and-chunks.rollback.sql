DROP TABLE chunks;
DROP TABLE conversations;
DROP TABLE service_instances;
