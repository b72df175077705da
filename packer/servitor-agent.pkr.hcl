# The Servitor agent's Spot instance image: Debian 12 (amd64) with Docker, git
# and the agent with its systemd unit, left unconfigured. user-data
# (user-data.sh) writes the configuration at first boot.
#
#   cargo build --release -p servitor-agent
#   packer init packer/servitor-agent.pkr.hcl
#   packer build -var region=eu-west-1 packer/servitor-agent.pkr.hcl

packer {
  required_plugins {
    amazon = {
      source = "github.com/hashicorp/amazon"
      # imds_support on the AMI needs 1.2 or later.
      version = ">= 1.2.0"
    }
  }
}

variable "region" {
  type        = string
  description = "AWS region the image is built and registered in."
}

variable "instance_type" {
  type        = string
  description = "Instance type of the temporary build instance (amd64)."
  default     = "t3.small"
}

variable "agent_binary" {
  type        = string
  description = "The agent binary to install, built with `cargo build --release -p servitor-agent`. Relative paths are relative to the directory packer runs in."
  default     = "target/release/servitor-agent"
}

variable "ami_name_prefix" {
  type        = string
  description = "Image name prefix; the build time is appended."
  default     = "servitor-agent"
}

variable "volume_size" {
  type        = number
  description = "Root volume size in GiB; job images and sources live on it."
  default     = 30
}

locals {
  # A fresh name per build: AMI names are unique in a region.
  ami_name = "${var.ami_name_prefix}-${formatdate("YYYYMMDD-hhmmss", timestamp())}"
  # The uploads go to a directory of their own so that removing them cannot
  # touch anything else in /tmp.
  upload_dir = "/tmp/servitor-image"
}

source "amazon-ebs" "servitor-agent" {
  region          = var.region
  instance_type   = var.instance_type
  ami_name        = local.ami_name
  ami_description = "Servitor agent on Debian 12 (amd64)"

  source_ami_filter {
    filters = {
      # Not debian-12-backports-*: the image uses the stable kernel.
      name                = "debian-12-amd64-*"
      architecture        = "x86_64"
      root-device-type    = "ebs"
      virtualization-type = "hvm"
    }
    # Debian's official cloud images account.
    owners      = ["136693071363"]
    most_recent = true
  }
  ssh_username = "admin"
  # The build's temporary key must not open every instance made from the image.
  ssh_clear_authorized_keys = true

  # The build instance: IMDSv2 only, and hop limit 1, so nothing behind a
  # bridge (a container started while provisioning) reaches metadata.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }
  # Instances launched from the image require IMDSv2 too; AWS gives them hop
  # limit 2 unless the launch template says 1, as it should (packer/README.md).
  imds_support = "v2.0"
  ena_support  = true

  # throughput and iops are gp3's baseline, which AWS applies anyway; they
  # are stated because Packer's built-in builder (1.6) refuses gp3 without.
  launch_block_device_mappings {
    device_name           = "/dev/xvda"
    volume_size           = var.volume_size
    volume_type           = "gp3"
    throughput            = 125
    iops                  = 3000
    delete_on_termination = true
  }

  tags = {
    Name        = local.ami_name
    Role        = "servitor-agent"
    BaseAMI     = "{{ .SourceAMI }}"
    BaseAMIName = "{{ .SourceAMIName }}"
  }
}

build {
  sources = ["source.amazon-ebs.servitor-agent"]

  provisioner "shell" {
    inline = ["mkdir -p ${local.upload_dir}"]
  }

  provisioner "file" {
    sources     = [var.agent_binary, "${path.root}/servitor-agent.service"]
    destination = "${local.upload_dir}/"
  }

  provisioner "shell" {
    script           = "${path.root}/provision.sh"
    environment_vars = ["UPLOAD_DIR=${local.upload_dir}"]
    execute_command  = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
  }

  provisioner "shell" {
    inline = ["rm -rf ${local.upload_dir}"]
  }
}
